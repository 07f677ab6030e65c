//! TLS for every PostgreSQL connection concord makes (the pool, its own connections, `concord
//! pg`), through rustls with the ring backend — no OpenSSL — chosen in the connection string as
//! libpq does:
//!
//! * `sslmode=disable`: plain text;
//! * `sslmode=prefer` (the default, as libpq): TLS when the server offers it, plain text
//!   otherwise; the certificate is not checked;
//! * `sslmode=require`: TLS or no connection; the certificate is not checked (it protects
//!   against eavesdropping, not against a server that impersonates another);
//! * `sslmode=verify-ca`: TLS, and the server's certificate must chain to a CA in
//!   `sslrootcert=FILE` (PEM; required);
//! * `sslmode=verify-full`: as `verify-ca`, and the certificate must name the host connected to.
//!
//! The driver (tokio-postgres) knows only `disable`, `prefer` and `require`, and no
//! `sslrootcert`: [`split`] takes both out of the connection string before it is parsed (a
//! `verify-*` mode becomes `require` for the driver, with the checks done here), and
//! [`PgTls`] is the driver's `MakeTlsConnect`. A failed check answers in words: which file,
//! which host, what to change.
//!
//! # Implementation caveats
//!
//! * No client certificates (`sslcert`, `sslkey`) and no certificate revocation lists.
//! * `require` with an `sslrootcert` checks nothing (libpq then checks as `verify-ca`): ask
//!   for `verify-ca` by name.
//! * No channel binding: SCRAM authenticates without it (`channel_binding=prefer`).
//! * Only the system's root CAs are not used: `verify-*` needs `sslrootcert`.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// The TLS modes of a connection string, as libpq names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain text.
    Disable,
    /// TLS when offered, unchecked.
    Prefer,
    /// TLS, unchecked.
    Require,
    /// TLS, the certificate chained to `sslrootcert`.
    VerifyCa,
    /// TLS, the certificate chained to `sslrootcert` and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The mode the driver is given: it checks nothing itself.
    fn for_driver(self) -> &'static str {
        match self {
            SslMode::VerifyCa | SslMode::VerifyFull => "require",
            other => other.name(),
        }
    }
}

/// What a connection string says about TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`.
    pub root_cert: Option<PathBuf>,
}

/// A connection string's TLS settings taken out of it: the string for the driver, and the
/// settings. Refuses an unknown `sslmode` and a `verify-*` mode without `sslrootcert`.
pub(crate) fn split(url: &str) -> Result<(String, TlsSettings), String> {
    let (driver, mode, root) = match url.split_once("://") {
        Some(_) => split_url(url),
        None => split_key_values(url),
    };
    let mode = match mode {
        None => SslMode::Prefer,
        Some(text) => SslMode::parse(&text).ok_or_else(|| {
            format!(
                "sslmode={text} is not a TLS mode: use disable, prefer, require, verify-ca or verify-full"
            )
        })?,
    };
    let settings = TlsSettings {
        mode,
        root_cert: root.map(PathBuf::from),
    };
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && settings.root_cert.is_none() {
        return Err(format!(
            "sslmode={} needs sslrootcert=FILE, the PEM file of the CA that signed the server's certificate",
            mode.name()
        ));
    }
    let driver = with_driver_mode(driver, url.contains("://"), mode);
    Ok((driver, settings))
}

/// A `postgres://…?k=v&…` URL without `sslmode` and `sslrootcert`.
fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for param in query.split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "sslmode" => mode = Some(percent_decode(value)),
            "sslrootcert" => root = Some(percent_decode(value)),
            _ => kept.push(param),
        }
    }
    let driver = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (driver, mode, root)
}

/// A `key=value …` string without `sslmode` and `sslrootcert` (values may be quoted).
fn split_key_values(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut kept = Vec::new();
    for (key, raw, value) in key_values(url) {
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    (kept.join(" "), mode, root)
}

/// The `key=value` pairs of a connection string: key, the value as written, the value.
/// Malformed text is kept as it is for the driver to refuse.
fn key_values(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        if key.is_empty() && chars.peek().is_none() {
            return out;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=');
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let (mut raw, mut value) = (String::new(), String::new());
        if chars.next_if_eq(&'\'').is_some() {
            raw.push('\'');
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            raw.push(escaped);
                            value.push(escaped);
                        }
                    }
                    '\'' => break,
                    _ => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())).collect();
            raw.clone_from(&value);
        }
        out.push((key, raw, value));
    }
}

/// `%XX` sequences decoded (a path in a URL).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The driver's string with the driver's `sslmode` (only when the string set one).
fn with_driver_mode(driver: String, is_url: bool, mode: SslMode) -> String {
    if mode == SslMode::Prefer {
        return driver;
    }
    let param = format!("sslmode={}", mode.for_driver());
    match (is_url, driver.contains('?')) {
        (true, true) => format!("{driver}&{param}"),
        (true, false) => format!("{driver}?{param}"),
        (false, _) if driver.is_empty() => param,
        (false, _) => format!("{driver} {param}"),
    }
}

/// The driver's `MakeTlsConnect`: rustls with the checks of the connection string's mode.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
    settings: Arc<TlsSettings>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl PgTls {
    /// The connector for `settings`: reads the CA file of a `verify-*` mode.
    pub(crate) fn new(settings: TlsSettings) -> Result<PgTls, String> {
        let provider = Arc::new(ring_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (&settings.root_cert, settings.mode) {
            (Some(file), SslMode::VerifyCa | SslMode::VerifyFull) => {
                let roots = Arc::new(read_roots(file)?);
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                        .build()
                        .map_err(|e| {
                            format!("use the CA in sslrootcert={}: {e}", file.display())
                        })?;
                Arc::new(Checked {
                    webpki,
                    full: settings.mode == SslMode::VerifyFull,
                })
            }
            _ => Arc::new(Unchecked(provider.signature_verification_algorithms)),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("set up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(PgTls {
            config: Arc::new(config),
            settings: Arc::new(settings),
        })
    }
}

/// rustls on ring, as tonic's `tls-ring` (rustls deprecates it only for lacking post-quantum
/// key exchange, which PostgreSQL servers do not offer yet).
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificates of a PEM file, as trust roots.
fn read_roots(file: &Path) -> Result<RootCertStore, String> {
    let unreadable = |e: &dyn fmt::Display| {
        format!(
            "read the CA certificates in sslrootcert={}: {e}; give the PEM file of the CA that signed the server's certificate",
            file.display()
        )
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(file).map_err(|e| unreadable(&e))?;
    for cert in certs {
        let cert = cert.map_err(|e| unreadable(&e))?;
        roots.add(cert).map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"no certificate in it"));
    }
    Ok(roots)
}

/// `verify-ca` and `verify-full`: the chain checked against the roots; the host name only for
/// `verify-full`.
#[derive(Debug)]
struct Checked {
    webpki: Arc<WebPkiServerVerifier>,
    full: bool,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.full => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `prefer` and `require`: any certificate, the handshake's signatures still checked.
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{domain} is not a host name TLS can check: {e}"),
            )
        })?;
        Ok(PgTlsConnect {
            tls: self.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub struct PgTlsConnect {
    tls: PgTls,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls.config));
        Box::pin(async move {
            let host = self.name.to_str().into_owned();
            match connector.connect(self.name, stream).await {
                Ok(tls) => Ok(PgTlsStream(Box::new(tls))),
                Err(e) => Err(handshake_error(&self.tls.settings, &host, e)),
            }
        })
    }
}

/// A failed handshake in words: which check failed and what to change.
fn handshake_error(settings: &TlsSettings, host: &str, e: io::Error) -> io::Error {
    let mode = settings.mode.name();
    let root = settings
        .root_cert
        .as_deref()
        .map_or_else(String::new, |p| p.display().to_string());
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let text = match rustls_error {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate is not valid for the host name {host} (sslmode={mode} checks the name): connect by a name the certificate lists, or use sslmode=verify-ca"
        ),
        Some(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => format!(
            "the server's certificate is not signed by a CA in sslrootcert={root} (sslmode={mode}): give the CA that signed it"
        ),
        Some(rustls::Error::InvalidCertificate(reason)) => format!(
            "the server's certificate was refused (sslmode={mode}, sslrootcert={root}): {reason:?}"
        ),
        _ => format!("TLS handshake with {host} (sslmode={mode}) failed: {e}"),
    };
    io::Error::new(io::ErrorKind::InvalidData, text)
}

/// A TLS connection to the server.
pub struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_both_forms() {
        let (driver, s) =
            split("host=h user=u sslmode=verify-full sslrootcert='/etc/ca dir/ca.pem' dbname=d")
                .unwrap();
        assert_eq!(driver, "host=h user=u dbname=d sslmode=require");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert.unwrap(), PathBuf::from("/etc/ca dir/ca.pem"));

        let (driver, s) =
            split("postgres://u@h/d?sslrootcert=%2Fca.pem&sslmode=verify-ca&a=1").unwrap();
        assert_eq!(driver, "postgres://u@h/d?a=1&sslmode=require");
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert.unwrap(), PathBuf::from("/ca.pem"));

        let (driver, s) = split("host=h").unwrap();
        assert_eq!((driver.as_str(), s.mode), ("host=h", SslMode::Prefer));
        let (driver, s) = split("postgres://h/d?sslmode=disable").unwrap();
        assert_eq!(driver, "postgres://h/d?sslmode=disable");
        assert_eq!(s.mode, SslMode::Disable);
        let (driver, _) = split("host=h sslmode = require").unwrap();
        assert_eq!(driver, "host=h sslmode=require");
    }

    #[test]
    fn verify_modes_need_a_root_certificate_and_modes_are_checked() {
        let e = split("host=h sslmode=verify-full").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        let e = split("host=h sslmode=sure").unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
        let e = PgTls::new(TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: Some("/nonexistent/ca.pem".into()),
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }
}
