//! A throwaway PostgreSQL 15 cluster, for tests, the demo and the benchmark.
//!
//! [`PgCluster::start`] runs Debian's `initdb` and `pg_ctl` (from [`PG_BIN`], or `$CONCORD_PG_BIN`)
//! in a new temporary directory, on a free loopback port, with `max_prepared_transactions` set
//! and trust authentication for local connections — never anything beyond 127.0.0.1 — except
//! for the role [`PASSWORD_ROLE`], which must give its password ([`PgCluster::password_url`]),
//! so that a password's way into a connection can be tested. When the
//! process runs as root (as CI does), the cluster runs as the `postgres` user, since `initdb`
//! refuses root. [`PgCluster::shared`] starts one cluster per process, lazily, for every test
//! of a test binary; [`PgCluster::database`] gives each test a database of its own.
//!
//! The cluster is stopped (`pg_ctl stop -m immediate`) and its directory removed when the
//! [`PgCluster`] is dropped — and, since a `static` is never dropped and a failing test may
//! abort, also by a small watchdog process started with it, which waits for this process to
//! end (polling every half second) and then does the same. So a cluster never outlives the
//! process that started it by more than a second, whether its tests pass, fail or panic.
//!
//! [`PgCluster::start_tls`] starts one with `ssl = on` and the certificate and key it is given
//! (a test makes them, with rcgen), so that connections with `sslmode=require`,
//! `verify-ca` and `verify-full` can be tested; it accepts plain-text connections too.
//!
//! A missing installation is an error that says how to install it ([`PgTestError::Missing`]);
//! nothing is skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Where Debian's PostgreSQL 15 binaries live.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// `max_prepared_transactions` of the clusters started here.
pub const MAX_PREPARED_TRANSACTIONS: u32 = 200;

/// The role that must authenticate with a password (`scram-sha-256`); every other role is
/// trusted. A superuser, created by [`PgCluster::password_url`].
pub const PASSWORD_ROLE: &str = "concord_password";

/// The password of [`PASSWORD_ROLE`].
pub const PASSWORD_ROLE_PASSWORD: &str = "pw of 'the' test\\role";

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PgTestError {
    /// PostgreSQL is not installed where expected.
    #[error(
        "PostgreSQL 15 is not installed: {0} is missing. Install it with `apt-get install -y postgresql` (scripts/test does), or point CONCORD_PG_BIN at its bin directory"
    )]
    Missing(PathBuf),
    /// A command failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed, or why it could not run.
        detail: String,
    },
    /// A file-system step failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A running throwaway cluster; see the module docs.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    /// The temporary directory holding everything (removed at drop).
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    /// Run commands as `postgres` (this process is root).
    as_postgres: bool,
    /// Started with `ssl = on` (`server.crt` and `server.key` in the data directory).
    ssl: bool,
}

/// The server's certificate (chain) and private key, PEM, for [`PgCluster::start_tls`].
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The certificate, then any intermediates (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, unencrypted).
    pub key_pem: String,
}

impl PgCluster {
    /// Starts a new cluster (about a second).
    pub fn start() -> Result<PgCluster, PgTestError> {
        PgCluster::start_with(None)
    }

    /// Starts a new cluster with `ssl = on`, serving `tls`'s certificate.
    pub fn start_tls(tls: &ServerTls) -> Result<PgCluster, PgTestError> {
        PgCluster::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ServerTls>) -> Result<PgCluster, PgTestError> {
        let bin = std::env::var_os("CONCORD_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(PG_BIN));
        for tool in ["initdb", "pg_ctl", "postgres"] {
            if !bin.join(tool).is_file() {
                return Err(PgTestError::Missing(bin.join(tool)));
            }
        }
        let as_postgres = is_root();
        let dir = make_dir(as_postgres)?;
        let data = dir.join("data");
        let mut cluster = PgCluster {
            bin,
            dir,
            data,
            port: 0,
            as_postgres,
            ssl: tls.is_some(),
        };
        cluster.spawn_watchdog()?;
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data.display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        cluster.require_password()?;
        if let Some(tls) = tls {
            cluster.install_tls(tls)?;
        }
        let mut last = None;
        for _ in 0..3 {
            cluster.port = free_port()?;
            match cluster.start_server() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| PgTestError::Command {
            command: "pg_ctl start".into(),
            detail: "no attempt".into(),
        }))
    }

    /// The cluster of this process, started at the first call. Panics with the reason (and how
    /// to install PostgreSQL) when it cannot start: a test that needs it must fail, not skip.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| match PgCluster::start() {
            Ok(cluster) => cluster,
            Err(e) => panic!("cannot start the test PostgreSQL cluster: {e}"),
        })
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    /// A connection string for database `db` as [`PASSWORD_ROLE`], without its password (which
    /// is [`PASSWORD_ROLE_PASSWORD`]); creates the role when missing.
    pub fn password_url(&self, db: &str) -> Result<String, PgTestError> {
        let password = PASSWORD_ROLE_PASSWORD.replace('\'', "''");
        self.psql(
            "postgres",
            &format!(
                "DO $$ BEGIN CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{password}'; \
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ),
        )?;
        Ok(format!(
            "host=127.0.0.1 port={} user={PASSWORD_ROLE} dbname={db}",
            self.port
        ))
    }

    /// Makes [`PASSWORD_ROLE`] authenticate with its password: a first line in `pg_hba.conf`.
    fn require_password(&self) -> Result<(), PgTestError> {
        let hba = self.data.join("pg_hba.conf");
        let io = |action| {
            let path = hba.clone();
            move |source| PgTestError::Io {
                action,
                path,
                source,
            }
        };
        let rules = std::fs::read_to_string(&hba).map_err(io("read"))?;
        let line = format!("host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, format!("{line}{rules}")).map_err(io("write"))
    }

    /// Writes the server's certificate and key where `ssl = on` looks (the data directory),
    /// owned by the server's user, the key readable by it alone.
    fn install_tls(&self, tls: &ServerTls) -> Result<(), PgTestError> {
        use std::os::unix::fs::PermissionsExt;
        for (file, pem, mode) in [
            ("server.crt", &tls.cert_pem, 0o644),
            ("server.key", &tls.key_pem, 0o600),
        ] {
            let path = self.data.join(file);
            let io = |action| {
                let path = path.clone();
                move |source| PgTestError::Io {
                    action,
                    path,
                    source,
                }
            };
            std::fs::write(&path, pem).map_err(io("write"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(io("set the mode of"))?;
            if self.as_postgres {
                chown_to_postgres(&path)?;
            }
        }
        Ok(())
    }

    /// Creates a new, empty database named `name` and returns its connection string.
    pub fn database(&self, name: &str) -> Result<String, PgTestError> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Runs `sql` with `psql` in database `db`; returns what it printed (unaligned, tuples
    /// only).
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, PgTestError> {
        let psql = self.bin.join("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let port = self.port.to_string();
        let args = [
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ];
        let output = Command::new(&psql)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| PgTestError::Command {
                command: format!("{} -c {sql:?}", psql.display()),
                detail: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(PgTestError::Command {
                command: format!("psql -c {sql:?}"),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) -> Result<(), PgTestError> {
        let data = self.data.display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
    }

    /// Starts the server again on the same port (after [`PgCluster::stop_immediate`]).
    pub fn restart(&self) -> Result<(), PgTestError> {
        self.start_server()
    }

    fn start_server(&self) -> Result<(), PgTestError> {
        let data = self.data.display().to_string();
        let log = self.dir.join("server.log").display().to_string();
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c max_prepared_transactions={MAX_PREPARED_TRANSACTIONS} -c max_connections=300",
            self.port,
            self.dir.display()
        );
        if self.ssl {
            options.push_str(" -c ssl=on");
        }
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start",
            ],
        )
        .map_err(|e| match e {
            PgTestError::Command { command, detail } => PgTestError::Command {
                command,
                detail: format!(
                    "{detail}; server log: {}",
                    std::fs::read_to_string(self.dir.join("server.log"))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
            },
            other => other,
        })
    }

    /// Runs one of the cluster's binaries (as `postgres` when root).
    fn run(&self, tool: &str, args: &[&str]) -> Result<(), PgTestError> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args).stdin(Stdio::null());
        let shown = format!("{} {}", program.display(), args.join(" "));
        let output = command.output().map_err(|e| PgTestError::Command {
            command: shown.clone(),
            detail: e.to_string(),
        })?;
        if output.status.success() {
            return Ok(());
        }
        Err(PgTestError::Command {
            command: shown,
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }

    /// A process that waits for this one to end, then stops the cluster and removes its
    /// directory.
    fn spawn_watchdog(&self) -> Result<(), PgTestError> {
        let stop = if self.as_postgres {
            "runuser -u postgres -- \"$1/pg_ctl\" -D \"$2/data\" -m immediate -w stop"
        } else {
            "\"$1/pg_ctl\" -D \"$2/data\" -m immediate -w stop"
        };
        let script = format!(
            "while kill -0 \"$3\" 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf \"$2\""
        );
        Command::new("sh")
            .args(["-c", &script, "concord-pg-watchdog"])
            .arg(&self.bin)
            .arg(&self.dir)
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| PgTestError::Command {
                command: "sh (the cluster's watchdog)".into(),
                detail: e.to_string(),
            })
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self.stop_immediate();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A new directory under the system's temp directory, owned by `postgres` when `as_postgres`.
fn make_dir(as_postgres: bool) -> Result<PathBuf, PgTestError> {
    let base = std::env::temp_dir();
    let mut n = 0u32;
    loop {
        let dir = base.join(format!("concord-pg-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                if as_postgres {
                    chown_to_postgres(&dir)?;
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(source) => {
                return Err(PgTestError::Io {
                    action: "create",
                    path: dir,
                    source,
                });
            }
        }
    }
}

fn chown_to_postgres(dir: &Path) -> Result<(), PgTestError> {
    let id = |flag: &str| -> Result<u32, PgTestError> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| PgTestError::Command {
                command: format!("id {flag} postgres"),
                detail: e.to_string(),
            })?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| PgTestError::Command {
                command: format!("id {flag} postgres"),
                detail: "there is no postgres user: install the postgresql package".into(),
            })
    };
    std::os::unix::fs::chown(dir, Some(id("-u")?), Some(id("-g")?)).map_err(|source| {
        PgTestError::Io {
            action: "chown to postgres",
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16, PgTestError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| PgTestError::Io {
        action: "bind",
        path: PathBuf::from("127.0.0.1:0"),
        source,
    })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| PgTestError::Io {
            action: "read the address of",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

/// Waits up to `deadline` for `check` to return true, polling every 50 ms.
pub fn wait_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
