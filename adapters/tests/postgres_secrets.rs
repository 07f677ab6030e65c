//! A PostgreSQL password is never printed, and need not be in `concord.toml`: `Debug` of a
//! parsed configuration and the errors of a malformed connection string do not contain it;
//! `password_file` gives it from a file (tried against the throwaway cluster, as a role that
//! must authenticate with its password); a conflict between password sources, an unreadable
//! file and an unset variable are typed errors naming the resource and the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use adapters::config::{self, Config, ConfigError, ConfigProblem};
use adapters::pgtest::{PASSWORD_ROLE_PASSWORD, PgCluster};
use adapters::postgres::{self, PostgresConfig, PostgresResource};

/// The password written into connection strings that must never be printed.
const SECRET: &str = "s3cret-Pw";
/// A variable no test sets.
const UNSET_VAR: &str = "CONCORD_TEST_PASSWORD_NEVER_SET_5c1e";
/// Bound on every open.
const OPEN_DEADLINE: Duration = Duration::from_secs(20);

/// Writes `text` as `concord.toml` in `dir`; returns its path.
fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("concord.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Loads a file whose resource `orders` is the postgres table `table`.
fn load(dir: &Path, table: &str) -> Result<Config, ConfigError> {
    let text =
        format!("node = 1\ndata_dir = \"data\"\n[resources.orders]\nkind = \"postgres\"\n{table}");
    Config::load(&write_config(dir, &text))
}

#[test]
fn debug_of_a_parsed_configuration_has_no_password() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), format!("{SECRET}\n")).unwrap();
    for table in [
        format!("url = \"host=h user=u password={SECRET}\"\n"),
        format!("url = \"host=h user=u password='{SECRET}' dbname=d\"\n"),
        format!("url = \"postgres://u:{SECRET}@h/d\"\n"),
        format!("url = \"postgres://u@h/d?password={SECRET}\"\n"),
        "url = \"host=h user=u\"\npassword_file = \"pw\"\n".to_string(),
    ] {
        let config = load(dir.path(), &table).unwrap();
        let shown = format!("{config:?} {:#?}", config.resources["orders"]);
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        let config::ResourceConfig::Postgres { url, .. } = &config.resources["orders"] else {
            panic!("not postgres")
        };
        let pg = PostgresConfig::new(url.clone(), 1);
        let shown = format!("{pg:?}");
        assert!(!shown.contains(SECRET) && shown.contains("***"), "{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_of_a_bad_connection_string_have_no_password() {
    for url in [
        format!("host=h password={SECRET} port=notaport"),
        format!("host=h password='{SECRET}"),
        format!("host=h password={SECRET} user"),
        format!("postgres://u:{SECRET}@h:notaport/d"),
        format!("postgres://u:{SECRET}@h/d?password={SECRET}&port=x"),
        format!("host=h password={SECRET} nonsense=1"),
    ] {
        let opening = PostgresResource::open("orders", PostgresConfig::new(url.clone(), 1));
        let Ok(opened) = tokio::time::timeout(OPEN_DEADLINE, opening).await else {
            panic!("open of {url:?} did not answer");
        };
        let Err(e) = opened else {
            panic!("{url:?} opened");
        };
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(
            text.contains("orders") && text.contains("invalid"),
            "{text}"
        );
    }
}

/// Refusals of password sources: each names the resource and the field, typed.
#[test]
fn password_source_problems_name_the_resource_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), SECRET).unwrap();
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let cases = [
        (
            format!("url = \"host=h\"\npassword_file = \"pw\"\npassword_env = \"{UNSET_VAR}\"\n"),
            "password_env",
        ),
        (
            format!("url = \"host=h password={SECRET}\"\npassword_file = \"pw\"\n"),
            "password_file",
        ),
        (
            "url = \"host=h\"\npassword_file = \"absent\"\n".to_string(),
            "password_file",
        ),
        (
            "url = \"host=h\"\npassword_file = \"empty\"\n".to_string(),
            "password_file",
        ),
        (
            format!("url = \"host=h\"\npassword_env = \"{UNSET_VAR}\"\n"),
            "password_env",
        ),
    ];
    for (table, field) in cases {
        let e = load(dir.path(), &table).unwrap_err();
        assert_eq!(
            e.problem,
            ConfigProblem::Password {
                resource: "orders".into(),
                field,
            },
            "{table}: {e}"
        );
        let text = e.to_string();
        assert!(
            text.contains("[resources.orders]") && text.contains(&format!("`{field}`")),
            "{text}"
        );
        assert!(!text.contains(SECRET), "{text}");
    }
    let foreign = "node = 1\ndata_dir = \"d\"\n[resources.u]\nkind = \"files\"\nroot = \"u\"\npassword_env = \"X\"\n";
    let e = Config::load(&write_config(dir.path(), foreign)).unwrap_err();
    assert!(e.to_string().contains("`password_env`"), "{e}");
}

/// `password_file` (relative to the configuration file) gives the password of a role that must
/// authenticate with it; the same file with a wrong password is refused by the server, without
/// printing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_opens_the_resource_against_the_real_server() {
    let cluster = PgCluster::shared();
    let superuser_url = cluster.database("secrets_file").unwrap();
    postgres::install("orders", &superuser_url).await.unwrap();
    let url = cluster.password_url("secrets_file").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    let table = format!("url = \"{url}\"\npassword_file = \"secrets/pg\"\n");

    std::fs::write(
        dir.path().join("secrets/pg"),
        format!("{PASSWORD_ROLE_PASSWORD}\n"),
    )
    .unwrap();
    let config = load(dir.path(), &table).unwrap();
    let opened = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &["orders"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(opened.len(), 1);
    drop(opened);

    std::fs::write(dir.path().join("secrets/pg"), SECRET).unwrap();
    let config = load(dir.path(), &table).unwrap();
    let refused = tokio::time::timeout(OPEN_DEADLINE, config::open_named(&config, &["orders"]))
        .await
        .unwrap()
        .err()
        .expect("a wrong password was accepted");
    let text = format!("{refused} {refused:?}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
}

/// The TOML parser quotes the line it refuses; a password on it is not shown.
#[test]
fn a_toml_error_on_the_line_of_a_password_does_not_show_it() {
    let dir = tempfile::tempdir().unwrap();
    for table in [
        format!("url = \"host=h password={SECRET}\n"),
        format!("url = postgres://u:{SECRET}@h/d\n"),
        format!("url = \"host=h\" password={SECRET}\n"),
    ] {
        let e = load(dir.path(), &table).unwrap_err();
        assert_eq!(e.problem, ConfigProblem::Malformed, "{e}");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(text.contains("line 5"), "{text}");
    }
}
