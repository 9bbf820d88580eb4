//! The command-line contract: init refuses to replace a CA, issued configs are private,
//! and clients find their configuration the documented way.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use walvault_tests::{try_run, Archive, TestDir};

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
            .arg("check")
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
            .arg("check")
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
