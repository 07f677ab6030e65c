//! Connecting to a coordinator daemon: the URL, TLS, and the bearer token every call carries.
//!
//! Every program that talks to a daemon — the participant library's remote mode, `concord
//! status`, `concord demo --remote`, the benchmarks and the tests — connects through
//! [`connect`] (or [`connect_lazy`]), so that the rules are the same everywhere:
//!
//! * `http://HOST:PORT` is plain text, `https://HOST:PORT` is TLS (rustls through tonic). A TLS
//!   connection trusts the CA certificate of [`ClientTls`] (there are no built-in roots: a
//!   daemon's certificate comes from the site's own CA), and presents a client certificate when
//!   one is given. An `https` URL without a [`ClientTls`] is refused before any connection.
//! * A [`Credentials`] token travels in every call's metadata as `authorization: Bearer
//!   <token>`. A token is never printed: [`Token`]'s `Debug` hides it.
//!
//! A token file holds the token on its first line (one trailing line end is not part of it);
//! an empty file, or a token with characters a gRPC metadata value cannot carry, is refused
//! with an error naming the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::coordinator_client::CoordinatorClient;

/// The largest message a client decodes (bytes): above any daemon's configured limit.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How long opening the connection may take (milliseconds).
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// The interval of HTTP/2 keepalive pings, so that a dead daemon — or one paused, whose
/// kernel still holds the connection open — is noticed (milliseconds) …
pub const KEEPALIVE_INTERVAL_MS: u64 = 1_000;
/// … and how long a ping may go unanswered before the connection is closed (milliseconds):
/// the calls on it fail, and a client of a failover pair looks for the primary.
pub const KEEPALIVE_TIMEOUT_MS: u64 = 1_000;

/// A generated client whose every call carries the credentials' token.
pub type Client = CoordinatorClient<InterceptedService<Channel, Auth>>;

/// A client of a daemon's `Replication` service (journal shipping, inventories).
pub type ReplicationClient =
    crate::v1::replication_client::ReplicationClient<InterceptedService<Channel, Auth>>;

/// A client of a node's `Failover` service (promote, demote, switchover, state).
pub type FailoverClient =
    crate::v1::failover_client::FailoverClient<InterceptedService<Channel, Auth>>;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse, or is neither `http://` nor `https://`.
    #[error(
        "daemon URL {url:?}: {reason}; write http://HOST:PORT (plain text) or https://HOST:PORT (TLS)"
    )]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An `https` URL without TLS settings, or TLS settings for an `http` URL.
    #[error("daemon URL {url}: {reason}")]
    TlsMismatch {
        /// The URL as given.
        url: String,
        /// What is missing or contradictory.
        reason: &'static str,
    },
    /// A credentials file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// What the file should hold (`token file`, `CA certificate`, …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A token with characters a metadata value cannot carry.
    #[error("the token is not usable: {0}; a token is printable ASCII without spaces")]
    Token(&'static str),
    /// The connection could not be opened.
    #[error(
        "cannot connect to the daemon at {url}: {source}; is `concord coordinator` running there?"
    )]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from its text, checked to be printable ASCII without spaces.
    pub fn new(text: impl Into<String>) -> Result<Token, ClientError> {
        let text = text.into();
        if text.is_empty() {
            return Err(ClientError::Token("it is empty"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Token(
                "it has spaces, control or non-ASCII characters",
            ));
        }
        Ok(Token(text))
    }

    /// The token held in `path` (its first line; one trailing line end is not part of it).
    pub fn from_file(path: &Path) -> Result<Token, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| ClientError::File {
            what: "token file",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        Token::new(text).map_err(|e| ClientError::File {
            what: "token file",
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// The token's text, for comparing or sending; never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<hidden>)")
    }
}

/// TLS settings of a client: the CA that signed the daemon's certificate, and optionally the
/// client's own certificate and key.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca_pem: Option<Vec<u8>>,
    identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// TLS trusting the CA certificate (PEM) in `ca_file`.
    pub fn with_ca_file(ca_file: &Path) -> Result<ClientTls, ClientError> {
        Ok(ClientTls::with_ca_pem(read_pem(ca_file, "CA certificate")?))
    }

    /// TLS trusting the CA certificate `ca_pem` (PEM).
    pub fn with_ca_pem(ca_pem: impl Into<Vec<u8>>) -> ClientTls {
        ClientTls {
            ca_pem: Some(ca_pem.into()),
            ..ClientTls::default()
        }
    }

    /// Presents the client certificate and key (PEM files) to a daemon that asks for one.
    pub fn identity_files(
        self,
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<ClientTls, ClientError> {
        let cert = read_pem(cert_file, "client certificate")?;
        let key = read_pem(key_file, "client key")?;
        Ok(self.identity_pem(cert, key))
    }

    /// Presents the client certificate and key (PEM).
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> ClientTls {
        self.identity_pem = Some((cert.into(), key.into()));
        self
    }

    /// The name the daemon's certificate must carry, when it is not the URL's host.
    pub fn domain(mut self, name: impl Into<String>) -> ClientTls {
        self.domain = Some(name.into());
        self
    }

    fn config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity_pem {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, ClientError> {
    let bytes = std::fs::read(path).map_err(|e| ClientError::File {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ClientError::File {
            what,
            path: path.to_path_buf(),
            reason: "not PEM (no -----BEGIN line)".to_string(),
        });
    }
    Ok(bytes)
}

/// What a client presents: a bearer token and TLS settings, both optional.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// Sent as `authorization: Bearer <token>` with every call.
    pub token: Option<Token>,
    /// Required for an `https` URL.
    pub tls: Option<ClientTls>,
}

impl Credentials {
    /// No token, no TLS: a plain-text daemon that checks no credentials.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// Sends `token` with every call.
    pub fn with_token(mut self, token: Token) -> Credentials {
        self.token = Some(token);
        self
    }

    /// Connects with TLS.
    pub fn with_tls(mut self, tls: ClientTls) -> Credentials {
        self.tls = Some(tls);
        self
    }
}

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Auth {
    header: Option<AsciiMetadataValue>,
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.header.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The endpoint of `url` with `credentials`' TLS, and the interceptor with its token (for a
/// client that sets its own timeouts, such as the heartbeat stream's).
pub fn endpoint(url: &str, credentials: &Credentials) -> Result<(Endpoint, Auth), ClientError> {
    let bad = |reason: String| ClientError::Url {
        url: url.to_string(),
        reason,
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(other) => return Err(bad(format!("unknown scheme {other:?}"))),
        None => return Err(bad("no scheme".to_string())),
    };
    if uri.host().is_none() {
        return Err(bad("no host".to_string()));
    }
    let mut endpoint = Endpoint::from(uri)
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
        .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    match (tls, &credentials.tls) {
        (true, Some(settings)) => {
            endpoint =
                endpoint
                    .tls_config(settings.config())
                    .map_err(|e| ClientError::Connect {
                        url: url.to_string(),
                        source: e,
                    })?;
        }
        (true, None) => {
            return Err(ClientError::TlsMismatch {
                url: url.to_string(),
                reason: "an https URL needs TLS settings (the CA certificate that signed the daemon's)",
            });
        }
        (false, Some(_)) => {
            return Err(ClientError::TlsMismatch {
                url: url.to_string(),
                reason: "TLS settings were given for a plain-text http URL; write https://",
            });
        }
        (false, None) => {}
    }
    let header = match &credentials.token {
        Some(token) => {
            let mut value: AsciiMetadataValue = format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| ClientError::Token("not a metadata value"))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    Ok((endpoint, Auth { header }))
}

fn client(channel: Channel, auth: Auth) -> Client {
    CoordinatorClient::with_interceptor(channel, auth)
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
}

/// Connects to the daemon at `url` (`http://HOST:PORT` or `https://HOST:PORT`), waiting at
/// most [`CONNECT_TIMEOUT_MS`].
pub async fn connect(url: &str, credentials: &Credentials) -> Result<Client, ClientError> {
    let (endpoint, auth) = endpoint(url, credentials)?;
    let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
        url: url.to_string(),
        source: e,
    })?;
    Ok(client(channel, auth))
}

/// Connects to the `Failover` service of the node at `url`, like [`connect`].
pub async fn connect_failover(
    url: &str,
    credentials: &Credentials,
) -> Result<FailoverClient, ClientError> {
    let (endpoint, auth) = endpoint(url, credentials)?;
    let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
        url: url.to_string(),
        source: e,
    })?;
    Ok(crate::v1::failover_client::FailoverClient::with_interceptor(channel, auth))
}

/// Connects to the `Replication` service of the daemon at `url`, like [`connect`].
pub async fn connect_replication(
    url: &str,
    credentials: &Credentials,
) -> Result<ReplicationClient, ClientError> {
    let (endpoint, auth) = endpoint(url, credentials)?;
    let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
        url: url.to_string(),
        source: e,
    })?;
    Ok(
        crate::v1::replication_client::ReplicationClient::with_interceptor(channel, auth)
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
    )
}

/// A client of the daemon at `url` that connects at its first call (and again after the
/// connection breaks).
pub fn connect_lazy(url: &str, credentials: &Credentials) -> Result<Client, ClientError> {
    let (endpoint, auth) = endpoint(url, credentials)?;
    Ok(client(endpoint.connect_lazy(), auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_hidden() {
        assert!(Token::new("").is_err());
        assert!(Token::new("a b").is_err());
        assert!(Token::new("caf\u{e9}").is_err());
        let token = Token::new("s3cret-token").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
        let creds = Credentials::none().with_token(token);
        assert!(!format!("{creds:?}").contains("s3cret"));
    }

    #[test]
    fn token_files_lose_one_line_end() {
        let dir = std::env::temp_dir().join(format!("concord-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(Token::from_file(&path).unwrap().expose(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        let err = Token::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("token file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn urls_and_tls_must_agree() {
        let none = Credentials::none();
        assert!(matches!(
            endpoint("127.0.0.1:7700", &none),
            Err(ClientError::Url { .. })
        ));
        assert!(matches!(
            endpoint("ftp://127.0.0.1:7700", &none),
            Err(ClientError::Url { .. })
        ));
        assert!(matches!(
            endpoint("https://127.0.0.1:7700", &none),
            Err(ClientError::TlsMismatch { .. })
        ));
        let tls = Credentials::none().with_tls(ClientTls::with_ca_pem(b"x".to_vec()));
        assert!(matches!(
            endpoint("http://127.0.0.1:7700", &tls),
            Err(ClientError::TlsMismatch { .. })
        ));
        assert!(endpoint("http://127.0.0.1:7700", &none).is_ok());
    }
}
