//! A site: one node's data directory, its `concord.toml`, its own PostgreSQL cluster (when the
//! test asks for one) and its running process — a primary (`concord coordinator`) or a standby
//! (`concord standby`).
//!
//! Every site has the same resources, each in its own data directory: files `uploads`, mail
//! `mail`, kv `index`, and with PostgreSQL the resource `orders` on the site's own throwaway
//! cluster ([`adapters::pgtest::PgCluster`]), whose table `public.orders` is created and set up
//! with `concord pg install` and `concord pg replicate` when the site is made. Those commands
//! read `setup.toml`, the same file without the `[replication]` or `[standby]` table, so that the
//! setup does not depend on the role.
//!
//! The primary serves plain text without tokens on a free loopback port (`[daemon]`), with a
//! `[replication]` table of the [`Mode`] asked for. The standby's `[standby]` table names its
//! primary's url (or the fault proxy's), rewritten at each [`Site::start_standby`]. Processes
//! are driven with real signals: [`Site::kill`] (SIGKILL), [`Site::pause`] (SIGSTOP),
//! [`Site::resume`] (SIGCONT), [`Site::stop`] (SIGTERM, exit 0 required).
//!
//! Implementation caveats: both sites are node 1, like `concord demo --standby`'s two
//! `Config::embedded` directories; standard error of each site's runs goes to
//! `<site>/stderr.log`.

use std::path::{Path, PathBuf};

use adapters::pgtest::PgCluster;

use crate::process::{self, Process};

/// How long a `concord pg` or `concord status` run may take.
const COMMAND_MS_MAX: u64 = 60_000;

/// The PostgreSQL database of each site.
pub const PG_DATABASE: &str = "shop";

/// The `orders` table both sites have.
pub const ORDERS_TABLE: &str =
    "CREATE TABLE public.orders (id bigint PRIMARY KEY, item text NOT NULL, qty integer NOT NULL)";

/// The primary's replication mode (the `[replication]` table's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No `[replication]` table: the defaults (async), as a primary with no standby has.
    Default,
    /// The primary never waits for the standby.
    Async,
    /// A commit is answered once the standby has its decision record durable.
    Sync,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Default => "",
            Mode::Async => "async",
            Mode::Sync => "sync",
        }
    }
}

/// What a site is.
#[derive(Clone, Debug)]
enum Role {
    Primary(Mode),
    Standby,
}

/// One site; see the module docs. Its process is SIGKILLed when it is dropped.
pub struct Site {
    /// `primary` or `standby` (or what the test named it).
    pub name: String,
    dir: PathBuf,
    role: Role,
    pg: Option<PgCluster>,
    process: Option<Process>,
}

impl Site {
    /// A primary in `root/<name>`, in `mode`, with its own PostgreSQL cluster when `postgres`.
    pub fn primary(root: &Path, name: &str, mode: Mode, postgres: bool) -> Site {
        Site::make(root, name, Role::Primary(mode), postgres)
    }

    /// A standby in `root/<name>`, with its own PostgreSQL cluster when `postgres`.
    pub fn standby(root: &Path, name: &str, postgres: bool) -> Site {
        Site::make(root, name, Role::Standby, postgres)
    }

    fn make(root: &Path, name: &str, role: Role, postgres: bool) -> Site {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let pg = postgres.then(|| {
            PgCluster::start().unwrap_or_else(|e| panic!("start {name}'s PostgreSQL: {e}"))
        });
        let site = Site {
            name: name.to_string(),
            dir,
            role,
            pg,
            process: None,
        };
        site.write_setup();
        if site.pg.is_some() {
            site.setup_postgres();
        }
        site
    }

    /// The site's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (`<site>/data`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The site's `concord.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("concord.toml")
    }

    /// The PostgreSQL connection string of `orders`, when the site has PostgreSQL.
    pub fn pg_url(&self) -> Option<String> {
        self.pg.as_ref().map(|pg| pg.url(PG_DATABASE))
    }

    /// The site's PostgreSQL cluster, when it has one.
    pub fn pg(&self) -> Option<&PgCluster> {
        self.pg.as_ref()
    }

    /// The resource tables, with data paths relative to the file.
    fn resources_toml(&self) -> String {
        let mut text = String::from(
            "[resources.uploads]\nkind = \"files\"\nroot = \"data/uploads\"\ncreate = true\n\n\
             [resources.mail]\nkind = \"mail\"\nmaildir = \"data/mail\"\ncreate = true\n\n\
             [resources.index]\nkind = \"kv\"\ndir = \"data/index\"\ncreate = true\n\n",
        );
        if let Some(url) = self.pg_url() {
            text.push_str(&format!(
                "[resources.orders]\nkind = \"postgres\"\nurl = \"{url}\"\npool_size = 16\n\n"
            ));
        }
        text
    }

    fn head_toml(&self) -> String {
        "node = 1\ndata_dir = \"data\"\ntxn_timeout_ms = 10000\n\n".to_string()
    }

    fn write_setup(&self) {
        let text = format!("{}{}", self.head_toml(), self.resources_toml());
        write(&self.dir.join("setup.toml"), &text);
    }

    /// Writes `concord.toml`: the resources, `[daemon]`, and the role's table.
    fn write_config(&self, primary_url: Option<&str>) {
        let role_table = match (&self.role, primary_url) {
            (Role::Primary(Mode::Default), _) => String::new(),
            (Role::Primary(mode), _) => format!("[replication]\nmode = \"{}\"\n", mode.name()),
            (Role::Standby, Some(url)) => format!("[standby]\nprimary = \"{url}\"\n"),
            (Role::Standby, None) => panic!("a standby needs its primary's url"),
        };
        let text = format!(
            "{}{}[daemon]\nplaintext = true\nunauthenticated = true\n\n{role_table}",
            self.head_toml(),
            self.resources_toml()
        );
        write(&self.config_path(), &text);
    }

    /// Creates the database and `public.orders`, then `concord pg install` and
    /// `concord pg replicate` on it.
    fn setup_postgres(&self) {
        let pg = self.pg.as_ref().expect("postgres site");
        pg.psql("postgres", &format!("CREATE DATABASE {PG_DATABASE}"))
            .unwrap_or_else(|e| panic!("create {}'s database: {e}", self.name));
        pg.psql(PG_DATABASE, ORDERS_TABLE)
            .unwrap_or_else(|e| panic!("create {}'s orders table: {e}", self.name));
        let setup = self.dir.join("setup.toml");
        let setup = setup.to_str().expect("utf-8 path");
        for args in [
            &["pg", "install", "--resource", "orders", "--config", setup][..],
            &[
                "pg",
                "replicate",
                "--resource",
                "orders",
                "public.orders",
                "--config",
                setup,
            ][..],
        ] {
            let (code, stdout, stderr) = process::run_concord(args, COMMAND_MS_MAX);
            assert_eq!(
                code,
                Some(0),
                "{}: concord {args:?}: {stdout}{stderr}",
                self.name
            );
        }
    }

    /// Starts the primary (`concord coordinator --config … --listen 127.0.0.1:0`).
    pub fn start_primary(&mut self) {
        assert!(
            matches!(self.role, Role::Primary(_)),
            "{} is a standby",
            self.name
        );
        assert!(self.process.is_none(), "{} is running", self.name);
        self.write_config(None);
        let config = self.config_path();
        let args = [
            "coordinator",
            "--config",
            config.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
        ];
        self.process = Some(Process::spawn(&self.name, &args, &self.stderr_path()));
    }

    /// Starts the standby following `primary_url` (the primary's url or the proxy's).
    pub fn start_standby(&mut self, primary_url: &str) {
        let args = self.standby_args(primary_url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.process = Some(Process::spawn(&self.name, &args, &self.stderr_path()));
    }

    /// Starts the standby following `primary_url` with `extra` flags (`--reseed`), giving it
    /// `start_ms` to say it listens.
    pub fn start_standby_with(&mut self, primary_url: &str, extra: &[&str], start_ms: u64) {
        let mut args = self.standby_args(primary_url);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::spawn_within(&self.name, &args, &self.stderr_path(), start_ms);
        self.process = Some(process);
    }

    /// Starts the standby following `primary_url` without waiting for its listening line
    /// (a standby expected to refuse).
    pub fn launch_standby(&mut self, primary_url: &str) {
        let args = self.standby_args(primary_url);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.process = Some(Process::launch(&self.name, &args, &self.stderr_path()));
    }

    fn standby_args(&mut self, primary_url: &str) -> Vec<String> {
        assert!(
            matches!(self.role, Role::Standby),
            "{} is a primary",
            self.name
        );
        assert!(self.process.is_none(), "{} is running", self.name);
        self.write_config(Some(primary_url));
        let config = self.config_path();
        vec![
            "standby".into(),
            "--config".into(),
            config.to_str().expect("utf-8 path").into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }

    /// Where the site's processes write their standard error.
    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }

    /// The running process.
    pub fn process(&self) -> &Process {
        self.process
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    /// The running process, mutably.
    pub fn process_mut(&mut self) -> &mut Process {
        let name = self.name.clone();
        self.process
            .as_mut()
            .unwrap_or_else(|| panic!("{name} is not running"))
    }

    /// Whether a process was started and not stopped or killed.
    pub fn is_started(&self) -> bool {
        self.process.is_some()
    }

    /// Forgets a process that exited by itself, returning it.
    pub fn take_process(&mut self) -> Option<Process> {
        self.process.take()
    }

    /// `http://ADDR` of the running process.
    pub fn url(&self) -> String {
        self.process().url()
    }

    /// The running process's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.process()
            .addr
            .parse()
            .unwrap_or_else(|e| panic!("{}'s address {:?}: {e}", self.name, self.process().addr))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// SIGSTOP.
    pub fn pause(&self) {
        self.process().pause();
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.process().resume();
    }

    /// SIGTERM; panics unless it exits 0.
    pub fn stop(&mut self) {
        let Some(process) = self.process.take() else {
            return;
        };
        let tail = process.stderr_tail();
        assert!(
            process.terminate(),
            "{} did not exit 0 after SIGTERM: {tail}",
            self.name
        );
    }

    /// `concord status --url … --json` of the running process; `None` when it does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        let url = self.url();
        let (code, stdout, _) =
            process::run_concord(&["status", "--url", &url, "--json"], COMMAND_MS_MAX);
        // Exit 3 is an unhealthy resource: the JSON is still printed.
        code?;
        serde_json::from_str(&stdout).ok()
    }

    /// `SELECT` rows of `orders` as `(id, row as JSON text)`, by id.
    pub fn orders_rows(&self) -> Vec<(i64, String)> {
        let pg = self.pg.as_ref().expect("postgres site");
        let out = pg
            .psql(
                PG_DATABASE,
                "SELECT id || '|' || row_to_json(o)::text FROM public.orders o ORDER BY id",
            )
            .unwrap_or_else(|e| panic!("read {}'s orders: {e}", self.name));
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (id, row) = line.split_once('|').expect("id|row");
                (id.parse().expect("an id"), row.to_string())
            })
            .collect()
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
