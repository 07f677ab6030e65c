//! PostgreSQL connections over TLS (rustls), against a throwaway cluster started with
//! `ssl = on` and a certificate made here (rcgen): a CA, and a server certificate it signed
//! for the IP address 127.0.0.1. `sslmode=require` connects; `verify-full` with the right CA
//! connects and commits a branch; `verify-ca` does not check the host name; a wrong CA or a
//! host name the certificate does not list is refused with words that say so; a `verify-*`
//! mode without `sslrootcert` is refused before connecting; and the session is encrypted
//! (`pg_stat_ssl`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use adapters::pgtest::{PgCluster, ServerTls};
use adapters::postgres::{self, PostgresConfig, PostgresResource};
use adapters::{Epoch, Resource, Vote, Xid};

/// Bound on every open.
const OPEN_DEADLINE: Duration = Duration::from_secs(20);

/// A CA (PEM) and what the server serves.
struct Certificates {
    ca_pem: String,
    other_ca_pem: String,
    server: ServerTls,
}

fn certificates() -> Certificates {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let issuer = ca("concord test CA");
    let other = ca("another CA");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = params.signed_by(&key, &issuer).unwrap();
    Certificates {
        ca_pem: issuer.pem(),
        other_ca_pem: other.pem(),
        server: ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    }
}

/// One cluster with TLS for this test binary, with its certificates.
fn cluster() -> &'static (PgCluster, Certificates) {
    static SHARED: std::sync::OnceLock<(PgCluster, Certificates)> = std::sync::OnceLock::new();
    SHARED.get_or_init(|| {
        let certs = certificates();
        let cluster = PgCluster::start_tls(&certs.server)
            .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL cluster with TLS: {e}"));
        (cluster, certs)
    })
}

/// A new database with the concord schema; its plain connection string.
async fn database(name: &str) -> String {
    let (cluster, _) = cluster();
    let url = cluster.database(name).unwrap();
    postgres::install("pg", &url).await.unwrap();
    cluster
        .psql(
            name,
            "CREATE TABLE notes (id integer PRIMARY KEY, note text)",
        )
        .unwrap();
    url
}

fn write_pem(dir: &Path, name: &str, pem: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

async fn open(url: &str) -> Result<Arc<PostgresResource>, adapters::ResourceError> {
    tokio::time::timeout(
        OPEN_DEADLINE,
        PostgresResource::open("pg", PostgresConfig::new(url, 1)),
    )
    .await
    .expect("open answers within its deadline")
}

fn xid() -> Xid {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Xid {
        node: 1,
        epoch: Epoch(1),
        seq: 7_000_000 + NEXT.fetch_add(1, Ordering::Relaxed),
    }
}

/// Whether the resource's sessions are encrypted, asked on one of them.
async fn encrypted(resource: &Arc<PostgresResource>) -> bool {
    let reader = xid();
    resource.begin(&reader).await.unwrap();
    let ssl: bool = resource
        .branch(&reader)
        .unwrap()
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    resource.rollback(&reader).await.unwrap();
    ssl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_connects_encrypted_and_disable_does_not_encrypt() {
    let url = database("tls_require").await;
    let resource = open(&format!("{url} sslmode=require")).await.unwrap();
    assert!(encrypted(&resource).await, "sslmode=require encrypts");
    drop(resource);
    let resource = open(&format!("{url} sslmode=disable")).await.unwrap();
    assert!(!encrypted(&resource).await, "sslmode=disable does not");
    drop(resource);
    // prefer (the default) takes TLS when the server offers it, as libpq does.
    let resource = open(&url).await.unwrap();
    assert!(
        encrypted(&resource).await,
        "sslmode=prefer encrypts when offered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_commits_a_branch_over_tls() {
    let (_, certs) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(dir.path(), "ca.pem", &certs.ca_pem);
    let plain = database("tls_verify_full").await;
    // The URL form too, with the CA's path percent-encoded where it must be.
    let port = cluster().0.port();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{port}/tls_verify_full?sslmode=verify-full&sslrootcert={}",
        ca.replace('/', "%2F")
    );
    postgres::install("pg", &url).await.unwrap();
    let resource = open(&url).await.unwrap();
    assert!(encrypted(&resource).await);

    let branch = xid();
    resource.begin(&branch).await.unwrap();
    resource
        .branch(&branch)
        .unwrap()
        .execute("INSERT INTO notes VALUES (1, 'over tls')", &[])
        .await
        .unwrap();
    assert!(matches!(
        resource.prepare(&branch).await.unwrap(),
        Vote::Commit { .. }
    ));
    resource.commit(&branch).await.unwrap();
    let (cluster, _) = cluster();
    let note = cluster
        .psql("tls_verify_full", "SELECT note FROM notes WHERE id = 1")
        .unwrap();
    assert_eq!(note.trim(), "over tls");
    drop(plain);

    // verify-ca checks the chain, not the name.
    let by_name = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=tls_verify_full sslmode=verify-ca sslrootcert={ca}"
    );
    let resource = open(&by_name).await.unwrap();
    assert!(encrypted(&resource).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_host_name_is_refused_with_words_that_say_so() {
    let (cluster, certs) = cluster();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_pem(dir.path(), "ca.pem", &certs.ca_pem);
    let other = write_pem(dir.path(), "other.pem", &certs.other_ca_pem);
    let url = database("tls_refused").await;
    let port = cluster.port();

    let wrong_ca = open(&format!("{url} sslmode=verify-full sslrootcert={other}"))
        .await
        .err()
        .expect("a certificate of another CA was accepted");
    let text = wrong_ca.to_string();
    assert!(
        text.contains("not signed by a CA in sslrootcert") && text.contains(&other),
        "{text}"
    );

    let wrong_host = format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=tls_refused sslmode=verify-full sslrootcert={ca}"
    );
    let text = open(&wrong_host)
        .await
        .err()
        .expect("a certificate for another host was accepted")
        .to_string();
    assert!(
        text.contains("not valid for the host name localhost") && text.contains("verify-ca"),
        "{text}"
    );

    let text = open(&format!("{url} sslmode=verify-full"))
        .await
        .err()
        .expect("verify-full without a CA was accepted")
        .to_string();
    assert!(text.contains("sslrootcert"), "{text}");
    let text = open(&format!(
        "{url} sslmode=verify-ca sslrootcert={}/absent.pem",
        dir.path().display()
    ))
    .await
    .err()
    .expect("an absent CA file was accepted")
    .to_string();
    assert!(text.contains("absent.pem"), "{text}");
}
