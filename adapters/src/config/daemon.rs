//! The `[daemon]` table of `concord.toml`: how `concord coordinator` serves — its address, TLS
//! or plain text, who may call (a bearer token per client, an operator token), its metrics
//! address and the limits it holds every client to.
//!
//! ```toml
//! [daemon]
//! listen = "0.0.0.0:7700"            # default 127.0.0.1:7700; `--listen` overrides it
//! tls_cert_file = "tls/daemon.crt"   # the daemon's certificate chain (PEM) …
//! tls_key_file = "tls/daemon.key"    # … and its private key (PEM)
//! tls_client_ca_file = "tls/ca.crt"  # optional: clients must present a certificate it signed
//! operator_token_file = "secrets/operator"  # the token of ListInDoubt, Resolve (and later promote/demote)
//! metrics_listen = "127.0.0.1:9700"  # optional: where Prometheus metrics are served
//! request_timeout_ms = 30000         # optional limits, see below
//!
//! [daemon.clients.shop]              # one bearer token per client, by the client's name
//! token_file = "secrets/shop"
//!
//! # Without TLS, plain text must be asked for:
//! # plaintext = true                 # serve without TLS (loopback only …)
//! # plaintext_any_address = true     # … unless this too: plain text on any address
//! # unauthenticated = true           # accept calls without a token (no client tokens then)
//! ```
//!
//! The idea: serving is refused unless what it exposes was chosen. A daemon serves TLS
//! (`tls_cert_file` and `tls_key_file`) or `plaintext = true`, never by default; plain text on
//! an address outside 127.0.0.0/8 and ::1 needs `plaintext_any_address` as well. It checks a
//! bearer token from `[daemon.clients.NAME]` on every call, or `unauthenticated = true` says
//! that it checks none; one of the two must be written. [`DaemonConfig::check_serving`] says
//! what to add when a table cannot serve, for the address the daemon would listen on; a
//! configuration without a `[daemon]` table loads (embedded mode needs none), and the daemon
//! refuses to start on it. [`Config::embedded`](super::Config::embedded) serves plain text on
//! loopback without tokens, as `concord coordinator --data DIR` has always done.
//!
//! Token files are read when the file loads: the token is the file's first line (one trailing
//! line end is not part of it), printable ASCII without spaces, at least
//! [`TOKEN_CHARS_MIN`] characters. Two clients may not share a token, nor a client the
//! operator's. A [`BearerToken`] never prints itself (`Debug` shows `<hidden>`), and a refusal
//! names the file, never its content. Relative paths are relative to the configuration file.
//!
//! The limits, with their defaults and bounds ([`DaemonLimits`]): `message_bytes_max` (4 MiB;
//! 64 KiB to 64 MiB), `chunk_bytes_max` (1 MiB; 4 KiB to `message_bytes_max` less 16 KiB),
//! `branches_per_txn_max` (16; 1 to 1024), `txns_per_client_max` (256; 1 to 1,000,000),
//! `request_timeout_ms` (30 s; 100 ms to a day), `drain_timeout_ms` (10 s; 1 ms to an hour).
//! A value outside its bounds is [`ConfigProblem::Invalid`](super::ConfigProblem::Invalid)
//! naming the field.
//!
//! # Implementation caveats
//!
//! * The TLS files are only named here; the daemon reads them when it starts (and a refusal
//!   there names the file), so a certificate renewed on disk takes effect at the next start.
//! * A token file's permissions are not checked.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The daemon's default listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";
/// The shortest token accepted (characters): a guessable token protects nothing.
pub const TOKEN_CHARS_MIN: usize = 16;
/// The longest token accepted (characters).
pub const TOKEN_CHARS_MAX: usize = 4096;

/// The `[daemon]` table, checked; [`DaemonConfig::default`] is what a file without one gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Whether the file has a `[daemon]` table (a file without one loads for embedded use; the
    /// daemon refuses to serve it).
    pub written: bool,
    /// The address to serve gRPC on (`--listen` overrides it).
    pub listen: SocketAddr,
    /// Serve without TLS: asked for explicitly, never a default.
    pub plaintext: bool,
    /// Allow plain text on an address outside 127.0.0.0/8 and ::1.
    pub plaintext_any_address: bool,
    /// The daemon's certificate and key, and the CA of client certificates, when it serves TLS.
    pub tls: Option<TlsFiles>,
    /// The bearer token of each client, by the client's name (what logs, metrics and the
    /// per-client limit use).
    pub clients: BTreeMap<String, BearerToken>,
    /// The token of the operator calls (`ListInDoubt`, `Resolve`, later promote and demote).
    pub operator_token: Option<BearerToken>,
    /// Accept calls without a token (then no client tokens are configured).
    pub unauthenticated: bool,
    /// Where the daemon serves its Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The limits every client is held to.
    pub limits: DaemonLimits,
}

/// The files of the daemon's TLS, absolute (or relative to the working directory when the
/// configuration was built in code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The daemon's certificate chain (PEM), `tls_cert_file`.
    pub cert_file: PathBuf,
    /// The daemon's private key (PEM), `tls_key_file`.
    pub key_file: PathBuf,
    /// The CA certificate(s) (PEM) that must have signed a client's certificate,
    /// `tls_client_ca_file`; `None`: clients present none.
    pub client_ca_file: Option<PathBuf>,
}

/// The limits of the daemon, each with its unit; `Begin` returns them to every client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DaemonLimits {
    /// The largest message the daemon decodes or sends (bytes).
    pub message_bytes_max: usize,
    /// The largest content chunk of a streamed call (bytes).
    pub chunk_bytes_max: usize,
    /// The most branches one transaction may have.
    pub branches_per_txn_max: u32,
    /// The most transactions one client may have open at once.
    pub txns_per_client_max: u32,
    /// The longest one call may take (milliseconds).
    pub request_timeout_ms: u64,
    /// How long SIGTERM waits for commits in flight (milliseconds).
    pub drain_timeout_ms: u64,
}

impl Default for DaemonLimits {
    fn default() -> DaemonLimits {
        DaemonLimits {
            message_bytes_max: 4 << 20,
            chunk_bytes_max: 1 << 20,
            branches_per_txn_max: 16,
            txns_per_client_max: 256,
            request_timeout_ms: 30_000,
            drain_timeout_ms: 10_000,
        }
    }
}

/// The bounds of each limit, inclusive: (field, least, most).
const LIMIT_BOUNDS: [(&str, u64, u64); 6] = [
    ("message_bytes_max", 64 << 10, 64 << 20),
    ("chunk_bytes_max", 4 << 10, 16 << 20),
    ("branches_per_txn_max", 1, 1024),
    ("txns_per_client_max", 1, 1_000_000),
    ("request_timeout_ms", 100, 86_400_000),
    ("drain_timeout_ms", 1, 3_600_000),
];

/// The room a streamed message needs besides its chunk (bytes).
const CHUNK_FRAMING_BYTES: usize = 16 << 10;

impl DaemonLimits {
    fn values(&self) -> [u64; 6] {
        [
            self.message_bytes_max as u64,
            self.chunk_bytes_max as u64,
            u64::from(self.branches_per_txn_max),
            u64::from(self.txns_per_client_max),
            self.request_timeout_ms,
            self.drain_timeout_ms,
        ]
    }

    /// Checks every limit against its bounds, and that a chunk fits in a message.
    pub fn check(&self) -> Result<(), String> {
        for ((field, least, most), value) in LIMIT_BOUNDS.iter().zip(self.values()) {
            if !(*least..=*most).contains(&value) {
                return Err(format!(
                    "[daemon]: field `{field}` is {value}; it must be between {least} and {most}"
                ));
            }
        }
        if self.chunk_bytes_max + CHUNK_FRAMING_BYTES > self.message_bytes_max {
            return Err(format!(
                "[daemon]: field `chunk_bytes_max` ({}) must leave {CHUNK_FRAMING_BYTES} bytes of \
                 `message_bytes_max` ({}) for the rest of a streamed message: lower it or raise \
                 `message_bytes_max`",
                self.chunk_bytes_max, self.message_bytes_max
            ));
        }
        Ok(())
    }
}

/// A bearer token from a token file. Its `Debug` never shows it; compare it with
/// [`BearerToken::expose`] in constant time only.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken {
    text: String,
    file: PathBuf,
}

impl BearerToken {
    /// The token in `file` (its first line; one trailing line end is not part of it), or why it
    /// is not usable (naming the file, never the content).
    pub fn from_file(file: &Path) -> Result<BearerToken, String> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            format!(
                "cannot read the token file {}: {e}; check the path and that this user may read it",
                file.display()
            )
        })?;
        let text = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        BearerToken::new(text, file)
            .map_err(|why| format!("the token file {}: {why}", file.display()))
    }

    /// A token from its text (`file`: where it came from, for messages).
    pub fn new(text: &str, file: &Path) -> Result<BearerToken, String> {
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the token has spaces, control or non-ASCII characters (or more than one line); \
                 a token is printable ASCII without spaces"
                    .into(),
            );
        }
        if !(TOKEN_CHARS_MIN..=TOKEN_CHARS_MAX).contains(&text.len()) {
            return Err(format!(
                "the token is {} characters; it must have {TOKEN_CHARS_MIN} to {TOKEN_CHARS_MAX} \
                 (make one with `openssl rand -hex 32`)",
                text.len()
            ));
        }
        Ok(BearerToken {
            text: text.to_string(),
            file: file.to_path_buf(),
        })
    }

    /// The token's text, for a constant-time comparison; never for printing.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The file it was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerToken(<hidden>, from {})", self.file.display())
    }
}

impl Default for DaemonConfig {
    fn default() -> DaemonConfig {
        DaemonConfig {
            written: false,
            listen: default_listen(),
            plaintext: false,
            plaintext_any_address: false,
            tls: None,
            clients: BTreeMap::new(),
            operator_token: None,
            unauthenticated: false,
            metrics_listen: None,
            limits: DaemonLimits::default(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7700))
}

/// Why a daemon configuration cannot serve ([`DaemonConfig::check_serving`]); each says what to
/// add to the `[daemon]` table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServeRefusal {
    /// Neither TLS nor plain text was chosen.
    #[error(
        "the daemon serves neither TLS nor plain text: add tls_cert_file and tls_key_file to the \
         [daemon] table (or, on a trusted host, plaintext = true)"
    )]
    NoTransport,
    /// Plain text on an address outside loopback, not forced.
    #[error(
        "listen address {addr} is not a loopback address and the daemon serves plain text: serve \
         TLS (tls_cert_file, tls_key_file), listen on 127.0.0.1, or add plaintext_any_address = \
         true to [daemon] (or pass --listen-any) to expose plain text there anyway"
    )]
    PlaintextNotLoopback {
        /// The address refused.
        addr: SocketAddr,
    },
    /// No client token, and `unauthenticated` not written.
    #[error(
        "the daemon has no client tokens: add a [daemon.clients.NAME] table with token_file = \
         \"…\" for each client (or, on a trusted host, unauthenticated = true)"
    )]
    NoCredentials,
}

impl DaemonConfig {
    /// The defaults of `concord coordinator --data DIR`: plain text on loopback, no tokens.
    pub fn embedded() -> DaemonConfig {
        DaemonConfig {
            written: true,
            plaintext: true,
            unauthenticated: true,
            ..DaemonConfig::default()
        }
    }

    /// Whether this table can serve on `listen` (the configured address or `--listen`'s);
    /// `any_address`: `--listen-any` was passed.
    pub fn check_serving(&self, listen: SocketAddr, any_address: bool) -> Result<(), ServeRefusal> {
        if self.tls.is_none() && !self.plaintext {
            return Err(ServeRefusal::NoTransport);
        }
        let forced = any_address || self.plaintext_any_address;
        if self.tls.is_none() && !listen.ip().is_loopback() && !forced {
            return Err(ServeRefusal::PlaintextNotLoopback { addr: listen });
        }
        if self.clients.is_empty() && !self.unauthenticated {
            return Err(ServeRefusal::NoCredentials);
        }
        Ok(())
    }
}

/// The `[daemon]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DaemonToml {
    listen: Option<SocketAddr>,
    #[serde(default)]
    plaintext: bool,
    #[serde(default)]
    plaintext_any_address: bool,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_client_ca_file: Option<PathBuf>,
    #[serde(default)]
    clients: BTreeMap<String, ClientToml>,
    operator_token_file: Option<PathBuf>,
    #[serde(default)]
    unauthenticated: bool,
    metrics_listen: Option<SocketAddr>,
    message_bytes_max: Option<usize>,
    chunk_bytes_max: Option<usize>,
    branches_per_txn_max: Option<u32>,
    txns_per_client_max: Option<u32>,
    request_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
}

/// A `[daemon.clients.NAME]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientToml {
    token_file: PathBuf,
}

impl DaemonToml {
    /// The checked table; relative paths are taken relative to `base` (the file's directory),
    /// and the token files are read.
    pub(super) fn into_config(self, base: &Path) -> Result<DaemonConfig, String> {
        let defaults = DaemonLimits::default();
        let limits = DaemonLimits {
            message_bytes_max: self.message_bytes_max.unwrap_or(defaults.message_bytes_max),
            chunk_bytes_max: self.chunk_bytes_max.unwrap_or(defaults.chunk_bytes_max),
            branches_per_txn_max: self
                .branches_per_txn_max
                .unwrap_or(defaults.branches_per_txn_max),
            txns_per_client_max: self
                .txns_per_client_max
                .unwrap_or(defaults.txns_per_client_max),
            request_timeout_ms: self
                .request_timeout_ms
                .unwrap_or(defaults.request_timeout_ms),
            drain_timeout_ms: self.drain_timeout_ms.unwrap_or(defaults.drain_timeout_ms),
        };
        limits.check()?;
        let tls = tls_files(
            base,
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_client_ca_file,
        )?;
        if self.plaintext && tls.is_some() {
            return Err(
                "[daemon]: `plaintext = true` and `tls_cert_file` both set: keep one (TLS, unless \
                 the daemon is only reached from this host)"
                    .into(),
            );
        }
        let clients = client_tokens(base, self.clients)?;
        if self.unauthenticated && !clients.is_empty() {
            return Err(
                "[daemon]: `unauthenticated = true` with [daemon.clients] tokens: a daemon either \
                 checks tokens or accepts calls without one; remove one of the two"
                    .into(),
            );
        }
        let operator_token = match self.operator_token_file {
            Some(file) => Some(
                BearerToken::from_file(&base.join(file))
                    .map_err(|e| format!("[daemon]: field `operator_token_file`: {e}"))?,
            ),
            None => None,
        };
        check_distinct(&clients, operator_token.as_ref())?;
        Ok(DaemonConfig {
            written: true,
            listen: self.listen.unwrap_or_else(default_listen),
            plaintext: self.plaintext,
            plaintext_any_address: self.plaintext_any_address,
            tls,
            clients,
            operator_token,
            unauthenticated: self.unauthenticated,
            metrics_listen: self.metrics_listen,
            limits,
        })
    }
}

/// The TLS files, both of certificate and key or neither; a client CA only with them.
fn tls_files(
    base: &Path,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert_file: base.join(cert),
            key_file: base.join(key),
            client_ca_file: client_ca.map(|ca| base.join(ca)),
        })),
        (None, None) if client_ca.is_some() => Err(
            "[daemon]: field `tls_client_ca_file` needs `tls_cert_file` and `tls_key_file`: \
             client certificates are asked for over TLS only"
                .into(),
        ),
        (None, None) => Ok(None),
        (Some(_), None) => Err(
            "[daemon]: field `tls_cert_file` is set without `tls_key_file`: add the key's file"
                .into(),
        ),
        (None, Some(_)) => Err(
            "[daemon]: field `tls_key_file` is set without `tls_cert_file`: add the certificate's \
             file"
                .into(),
        ),
    }
}

/// Each client's token, read from its file; a client's name is letters, digits, '_' or '-'.
fn client_tokens(
    base: &Path,
    clients: BTreeMap<String, ClientToml>,
) -> Result<BTreeMap<String, BearerToken>, String> {
    let mut tokens = BTreeMap::new();
    for (name, client) in clients {
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(format!(
                "client name {name:?} in [daemon.clients] must be 1 to 128 letters, digits, '_' \
                 or '-'"
            ));
        }
        let token = BearerToken::from_file(&base.join(&client.token_file))
            .map_err(|e| format!("[daemon.clients.{name}]: field `token_file`: {e}"))?;
        tokens.insert(name, token);
    }
    Ok(tokens)
}

/// Refuses a token two clients share, or a client's token that is the operator's.
fn check_distinct(
    clients: &BTreeMap<String, BearerToken>,
    operator: Option<&BearerToken>,
) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, token) in clients {
        if let Some(other) = seen.insert(token.expose(), name) {
            return Err(format!(
                "[daemon.clients.{name}]: its token is the token of [daemon.clients.{other}]: \
                 give each client its own, so that the daemon can tell them apart"
            ));
        }
        if operator.is_some_and(|op| op.expose() == token.expose()) {
            return Err(format!(
                "[daemon.clients.{name}]: its token is the operator's (operator_token_file): the \
                 operator token must be kept apart from every client's"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(dir: &Path, text: &str) -> Result<DaemonConfig, String> {
        let raw: DaemonToml = toml::from_str(text).map_err(|e| e.to_string())?;
        raw.into_config(dir)
    }

    fn token_file(dir: &Path, name: &str, token: &str) {
        std::fs::write(dir.join(name), format!("{token}\n")).unwrap();
    }

    #[test]
    fn defaults_are_todays_constants_and_serve_nothing_unasked() {
        let dir = tempfile::tempdir().unwrap();
        let config = parse(dir.path(), "").unwrap();
        assert_eq!(config.listen, default_listen());
        assert_eq!(config.limits, DaemonLimits::default());
        assert_eq!(
            config.check_serving(config.listen, false),
            Err(ServeRefusal::NoTransport)
        );
        let plain = parse(dir.path(), "plaintext = true").unwrap();
        assert_eq!(
            plain.check_serving(plain.listen, false),
            Err(ServeRefusal::NoCredentials)
        );
        let open = parse(dir.path(), "plaintext = true\nunauthenticated = true").unwrap();
        assert!(open.check_serving(open.listen, false).is_ok());
        let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        assert!(matches!(
            open.check_serving(any, false),
            Err(ServeRefusal::PlaintextNotLoopback { .. })
        ));
        assert!(open.check_serving(any, true).is_ok());
        assert!(
            DaemonConfig::embedded()
                .check_serving(default_listen(), false)
                .is_ok()
        );
    }

    #[test]
    fn limits_out_of_bounds_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        for (text, field) in [
            ("branches_per_txn_max = 0", "branches_per_txn_max"),
            ("txns_per_client_max = 0", "txns_per_client_max"),
            ("message_bytes_max = 0", "message_bytes_max"),
            ("message_bytes_max = 1099511627776", "message_bytes_max"),
            ("request_timeout_ms = 0", "request_timeout_ms"),
            ("drain_timeout_ms = 0", "drain_timeout_ms"),
            ("chunk_bytes_max = 4194304", "chunk_bytes_max"),
        ] {
            let err = parse(dir.path(), text).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        let ok = parse(
            dir.path(),
            "branches_per_txn_max = 1\nrequest_timeout_ms = 500",
        )
        .unwrap();
        assert_eq!(ok.limits.branches_per_txn_max, 1);
        assert_eq!(ok.limits.request_timeout_ms, 500);
    }

    #[test]
    fn tokens_are_read_checked_and_hidden() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), "shop", "shop-token-0123456789");
        token_file(dir.path(), "op", "operator-token-0123456789");
        let config = parse(
            dir.path(),
            "plaintext = true\noperator_token_file = \"op\"\n[clients.shop]\ntoken_file = \"shop\"",
        )
        .unwrap();
        assert_eq!(config.clients["shop"].expose(), "shop-token-0123456789");
        let shown = format!("{config:?}");
        assert!(!shown.contains("shop-token"), "{shown}");
        assert!(!shown.contains("operator-token"), "{shown}");

        token_file(dir.path(), "short", "abc");
        let err = parse(dir.path(), "[clients.a]\ntoken_file = \"short\"").unwrap_err();
        assert!(err.contains("token_file") && err.contains("short"), "{err}");
        assert!(!err.contains("abc\""), "{err}");
        let err = parse(dir.path(), "[clients.a]\ntoken_file = \"missing\"").unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        let err = parse(
            dir.path(),
            "[clients.a]\ntoken_file = \"shop\"\n[clients.b]\ntoken_file = \"shop\"",
        )
        .unwrap_err();
        assert!(
            err.contains("[daemon.clients.a]") || err.contains("[daemon.clients.b]"),
            "{err}"
        );
        let err = parse(
            dir.path(),
            "operator_token_file = \"shop\"\n[clients.a]\ntoken_file = \"shop\"",
        )
        .unwrap_err();
        assert!(err.contains("operator"), "{err}");
        let err = parse(
            dir.path(),
            "unauthenticated = true\n[clients.a]\ntoken_file = \"shop\"",
        )
        .unwrap_err();
        assert!(err.contains("unauthenticated"), "{err}");
    }

    #[test]
    fn tls_needs_both_files_and_excludes_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let err = parse(dir.path(), "tls_cert_file = \"c\"").unwrap_err();
        assert!(err.contains("tls_key_file"), "{err}");
        let err = parse(dir.path(), "tls_client_ca_file = \"ca\"").unwrap_err();
        assert!(err.contains("tls_client_ca_file"), "{err}");
        let err = parse(
            dir.path(),
            "plaintext = true\ntls_cert_file = \"c\"\ntls_key_file = \"k\"",
        )
        .unwrap_err();
        assert!(err.contains("plaintext"), "{err}");
        let tls = parse(
            dir.path(),
            "tls_cert_file = \"c\"\ntls_key_file = \"k\"\nunauthenticated = true",
        )
        .unwrap();
        assert_eq!(tls.tls.as_ref().unwrap().cert_file, dir.path().join("c"));
        let any: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        assert!(
            tls.check_serving(any, false).is_ok(),
            "TLS may listen anywhere"
        );
    }

    #[test]
    fn a_loaded_file_reads_its_token_files_relative_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        token_file(&dir.path().join("secrets"), "shop", "shop-token-0123456789");
        let path = dir.path().join("concord.toml");
        std::fs::write(
            &path,
            "node = 1\ndata_dir = \"data\"\n[daemon]\nlisten = \"0.0.0.0:7701\"\n\
             tls_cert_file = \"tls/c.pem\"\ntls_key_file = \"tls/k.pem\"\n\
             metrics_listen = \"127.0.0.1:9700\"\n\
             [daemon.clients.shop]\ntoken_file = \"secrets/shop\"\n",
        )
        .unwrap();
        let config = super::super::Config::load(&path).unwrap();
        let daemon = &config.daemon;
        assert!(daemon.written);
        assert_eq!(daemon.listen, "0.0.0.0:7701".parse().unwrap());
        assert_eq!(
            daemon.metrics_listen,
            Some("127.0.0.1:9700".parse().unwrap())
        );
        assert_eq!(
            daemon.clients["shop"].file(),
            dir.path().join("secrets/shop")
        );
        let tls = daemon.tls.as_ref().unwrap();
        assert_eq!(tls.key_file, dir.path().join("tls/k.pem"));

        std::fs::write(
            &path,
            "node = 1\ndata_dir = \"data\"\n[daemon]\nlisen = 1\n",
        )
        .unwrap();
        let err = super::super::Config::load(&path).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        std::fs::write(
            &path,
            "node = 1\ndata_dir = \"data\"\n[daemon]\nbranches_per_txn_max = 0\n",
        )
        .unwrap();
        let err = super::super::Config::load(&path).unwrap_err();
        assert_eq!(err.problem, super::super::ConfigProblem::Invalid);
        assert!(err.to_string().contains("branches_per_txn_max"), "{err}");
    }
}
