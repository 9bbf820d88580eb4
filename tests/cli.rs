//! The command-line contract: init refuses to replace a CA, issued configs are private,
//! clients find their configuration the documented way, and serve reports the address it
//! bound.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use walvault_tests::{
    run, tail_file, try_run, wait_for, Archive, BgProcess, Binaries, TestDir, WAIT_TIMEOUT,
};

#[test]
fn init_refuses_to_overwrite_a_ca_and_issued_configs_are_private() {
    let archive = Archive::start("main");
    let ca = fs::read(archive.data_dir().join("tls/ca.pem")).unwrap();
    let key = fs::read(archive.data_dir().join("tls/ca.key")).unwrap();
    let again = try_run(
        Command::new(archive.bins().archived())
            .args(["init", "--data-dir"])
            .arg(archive.data_dir())
            .args(["--listen", "127.0.0.1:1"]),
    );
    assert!(
        !again.success(),
        "a second init over an existing CA succeeded"
    );
    assert!(
        again.stderr.contains("refusing to overwrite"),
        "{}",
        again.describe()
    );
    assert_eq!(
        fs::read(archive.data_dir().join("tls/ca.pem")).unwrap(),
        ca,
        "CA certificate changed"
    );
    assert_eq!(
        fs::read(archive.data_dir().join("tls/ca.key")).unwrap(),
        key,
        "CA key changed"
    );

    let conf = archive.issue("main", "push");
    // Only pullclient reads [prefetch] and [archive_get]: a push config has neither, a
    // pull config both (and an old push config that has them still loads).
    let push_text = fs::read_to_string(&conf).unwrap();
    let pull_text = fs::read_to_string(archive.issue("main", "pull")).unwrap();
    for table in ["[prefetch]", "[archive_get]"] {
        assert!(
            !push_text.contains(table),
            "push config has {table}:\n{push_text}"
        );
        assert!(
            pull_text.contains(table),
            "pull config lacks {table}:\n{pull_text}"
        );
    }
    let old_push = archive.data_dir().join("old-push.toml");
    let tables = pull_text.find("\n[").unwrap();
    fs::write(&old_push, format!("{push_text}{}", &pull_text[tables..])).unwrap();
    walvault_protocol::net::config::ClientConfig::load(&old_push)
        .expect("a push config with [prefetch] and [archive_get] (as issued before) loads");
    let mode = fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode,
        0o600,
        "issued config {} has mode {mode:o}",
        conf.display()
    );
    for private in ["tls/ca.key", "tls/server.key", "admin.toml"] {
        let mode = fs::metadata(archive.data_dir().join(private))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{private} has mode {mode:o}");
    }
    // issue never replaces an existing file.
    let out = try_run(
        Command::new(archive.bins().archived())
            .args(["issue", "--cluster", "main", "--role", "pull", "--out"])
            .arg(&conf)
            .arg("--data-dir")
            .arg(archive.data_dir()),
    );
    assert!(!out.success(), "issue replaced an existing config");
}

#[test]
fn clients_find_their_config_by_flag_environment_or_default_path() {
    let archive = Archive::start("main");
    let conf = archive.issue("main", "push");
    let dir = TestDir::new("cliconf");
    let check = |cmd: &mut Command| try_run(cmd.current_dir(dir.path()));

    let by_flag = check(
        Command::new(archive.bins().pushclient())
            .args(["check", "--archive-only"])
            .arg("--config")
            .arg(&conf),
    );
    assert!(by_flag.success(), "{}", by_flag.describe());
    assert!(
        by_flag.stdout.contains("cluster main, role push"),
        "{}",
        by_flag.describe()
    );

    let by_env = check(
        Command::new(archive.bins().pushclient())
            .args(["check", "--archive-only"])
            .env("WALVAULT_CONFIG", &conf),
    );
    assert!(by_env.success(), "{}", by_env.describe());

    let none = check(
        Command::new(archive.bins().pushclient())
            .arg("check")
            .env_remove("WALVAULT_CONFIG"),
    );
    assert!(!none.success());
    assert!(
        none.stderr.contains("/etc/walvault/pushclient.toml")
            || fs::metadata("/etc/walvault/pushclient.toml").is_ok(),
        "the error should name the default path:\n{}",
        none.describe()
    );
    let none = check(
        Command::new(archive.bins().pullclient())
            .args(["archive-get", "000000010000000000000001", "x"])
            .env_remove("WALVAULT_CONFIG"),
    );
    assert_eq!(none.code(), Some(126), "{}", none.describe());
    assert!(
        none.stderr.contains("/etc/walvault/pullclient.toml"),
        "{}",
        none.describe()
    );
}

/// `archived serve --listen-address-file`: with `listen` port 0 the kernel picks the
/// port, and the file says which, once the socket is bound. This is how the harness
/// starts every archive, so concurrent test runs never race for a port.
#[test]
fn serve_reports_the_address_it_bound_when_the_kernel_picks_the_port() {
    let dir = TestDir::new("listenfile");
    let bins = Binaries::copy_to(&dir.join("bin"));
    let data = dir.join("data");
    run(
        "archived init --listen 127.0.0.1:0",
        Command::new(bins.archived())
            .args(["init", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"]),
    );
    let address_file = dir.join("listen-address");
    let stderr = dir.join("archived.stderr");
    let mut server = BgProcess::spawn(
        "archived serve",
        Command::new(bins.archived())
            .args(["serve", "--data-dir"])
            .arg(&data)
            .arg("--listen-address-file")
            .arg(&address_file),
        &dir.join("archived"),
    );
    let addr: SocketAddr = wait_for(
        "archived serve to write its listen address file",
        WAIT_TIMEOUT,
        || {
            assert!(
                server.try_wait().is_none(),
                "archived serve exited\n{}",
                tail_file(&stderr, 30)
            );
            fs::read_to_string(&address_file).ok()
        },
        || tail_file(&stderr, 30),
    )
    .trim_end()
    .parse()
    .unwrap_or_else(|e| panic!("{} does not hold an IP:port: {e}", address_file.display()));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(
        addr.port(),
        0,
        "the file holds the configured port 0, not the bound one"
    );
    let taken = std::net::UdpSocket::bind(addr);
    assert!(
        taken.is_err(),
        "{addr} is not bound by archived serve (a bind to it succeeded)"
    );
    assert!(server.try_wait().is_none(), "{}", server.stderr_tail(30));
}

/// A conninfo keyword walvault does not implement is refused at once, naming it: not
/// accepted and ignored while pushclient waits on a server that never answers (a
/// listener that accepts nothing would hold it for its 30 s connect timeout).
#[test]
fn a_conninfo_keyword_walvault_does_not_implement_fails_fast() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    for (conninfo, keyword) in [
        (
            format!("host=127.0.0.1 port={port} options='-c statement_timeout=0'"),
            "options",
        ),
        (
            format!("postgresql://127.0.0.1:{port}/postgres?target_session_attrs=read-write"),
            "target_session_attrs",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = try_run(
            Command::new(archive.bins().pushclient())
                .args(["backup", "--fast", "--config"])
                .arg(&push)
                .args(["--conninfo", &conninfo]),
        );
        let took = started.elapsed();
        assert_eq!(out.code(), Some(1), "{}", out.describe());
        assert!(
            out.stderr.contains(keyword) && out.stderr.contains("not implemented"),
            "the error should name {keyword}\n{}",
            out.describe()
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "took {took:?}: the keyword should be refused before connecting"
        );
    }
}
