//! The daemon's TLS (rustls through tonic): its certificate and key from the `[daemon]` table's
//! files, and, when `tls_client_ca_file` is set, mutual TLS — every client must present a
//! certificate that CA signed, or the handshake fails before any call.
//!
//! The files are read when the daemon starts, and each refusal names the file at fault: one
//! that cannot be read, one that holds no PEM block of the kind it should, or a certificate and
//! key that rustls refuses together (a key that does not match the certificate, say).
//!
//! # Caveats
//!
//! * A client certificate is checked against the CA only: its subject is not matched to a
//!   client's name (the bearer token names the client).
//! * No revocation list is consulted, and renewed files take effect at the next start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use adapters::config::TlsFiles;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::config::TLS_HANDSHAKE_MS_MAX;

/// Why the daemon's TLS cannot be set up; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read the {what} {}: {source}; check `{field}` in [daemon] and the file's permissions", path.display())]
    Unreadable {
        /// What the file should hold.
        what: &'static str,
        /// The field naming it.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("the {what} {} holds no `-----BEGIN …{marker}-----` block: `{field}` names a PEM file of that kind", path.display())]
    NotPem {
        /// What the file should hold.
        what: &'static str,
        /// The field naming it.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The end of the PEM label looked for.
        marker: &'static str,
    },
    /// rustls refused the files together.
    #[error("TLS with {}: {reason}; check that the files are PEM and belong together", files.join(" and "))]
    Refused {
        /// The files involved, with their fields.
        files: Vec<String>,
        /// What rustls said.
        reason: String,
    },
}

/// One PEM file the daemon reads: what it holds, the field naming it, the label it must have.
struct PemFile<'a> {
    what: &'static str,
    field: &'static str,
    path: &'a Path,
    marker: &'static str,
}

impl PemFile<'_> {
    fn read(&self) -> Result<Vec<u8>, TlsError> {
        let bytes = std::fs::read(self.path).map_err(|source| TlsError::Unreadable {
            what: self.what,
            field: self.field,
            path: self.path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let labelled = text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.ends_with(&format!("{}-----", self.marker)));
        if !labelled {
            return Err(TlsError::NotPem {
                what: self.what,
                field: self.field,
                path: self.path.to_path_buf(),
                marker: self.marker,
            });
        }
        Ok(bytes)
    }

    fn named(&self) -> String {
        format!("{} {}", self.field, self.path.display())
    }
}

/// The server with the TLS of `files`, checked now.
pub fn configure(server: Server, files: &TlsFiles) -> Result<Server, TlsError> {
    let cert = PemFile {
        what: "certificate",
        field: "tls_cert_file",
        path: &files.cert_file,
        marker: "CERTIFICATE",
    };
    let key = PemFile {
        what: "private key",
        field: "tls_key_file",
        path: &files.key_file,
        marker: "PRIVATE KEY",
    };
    let identity = Identity::from_pem(cert.read()?, key.read()?);
    let config = ServerTlsConfig::new()
        .identity(identity)
        .timeout(Duration::from_millis(TLS_HANDSHAKE_MS_MAX));
    // The identity alone first, so that a refusal names the files at fault.
    let refused = |files: Vec<String>| {
        move |e: tonic::transport::Error| TlsError::Refused {
            files,
            reason: source_chain(&e),
        }
    };
    let pair = vec![cert.named(), key.named()];
    let Some(ca_path) = &files.client_ca_file else {
        return server.tls_config(config).map_err(refused(pair));
    };
    let ca = PemFile {
        what: "client CA certificate",
        field: "tls_client_ca_file",
        path: ca_path,
        marker: "CERTIFICATE",
    };
    let ca_pem = ca.read()?;
    Server::builder()
        .tls_config(config.clone())
        .map_err(refused(pair))?;
    let mutual = config.client_ca_root(Certificate::from_pem(ca_pem));
    server.tls_config(mutual).map_err(refused(vec![ca.named()]))
}

/// Whether the daemon could serve TLS with `files` (`concord config check`): every file read
/// and checked as at start, nothing served.
pub fn check(files: &TlsFiles) -> Result<(), TlsError> {
    configure(Server::builder(), files).map(drop)
}

/// An error and its causes, in one line.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
