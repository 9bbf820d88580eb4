//! PostgreSQL's configuration files: reads settings from the files PostgreSQL reads them
//! from (the prefetch daemon needs them before it can connect: archive recovery accepts no
//! connections until it is consistent, and never with `hot_standby = off`).
//!
//! Sources, later ones winning, as PostgreSQL applies them:
//!
//! ```text
//! <config_file>            PGDATA/postgresql.conf unless postmaster.opts names another
//!   include 'f'            relative to the including file's directory
//!   include_if_exists 'f'  the same, silently skipped when missing
//!   include_dir 'd'        every *.conf in d (not starting with '.'), in name order
//! PGDATA/postgresql.auto.conf   ALTER SYSTEM (and pullclient restore) write here
//! postmaster.opts          the running postmaster's command line: -c name=value, --name=value
//! ```
//!
//! A line is `name = value` or `name value`, `#` starts a comment, a value may be
//! single-quoted with `''` or `\'` for a quote. Names are case-insensitive. What cannot
//! be read is skipped: the caller falls back to PostgreSQL's default and the daemon
//! still asks the server with `SHOW` once a connection works.
//!
//! Editing (`replace_settings`): a restore writes its recovery settings into
//! `postgresql.auto.conf`, which came with the backup and may already carry recovery
//! settings of an earlier restore of that cluster (PostgreSQL leaves them there after
//! promotion). Appending would leave those in force wherever ours do not name the same key:
//! a stale `recovery_target_time` would stop a later restore that asked for no target. So
//! every earlier assignment of a key we set, or that the caller drops, is commented out
//! (kept for the DBA to read, with a note), and ours are appended. Values are quoted as
//! `ALTER SYSTEM` quotes them: single quotes and backslashes doubled.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Include depth PostgreSQL allows (`CONF_FILE_MAX_DEPTH`).
const MAX_DEPTH: usize = 10;

/// The settings named in `wanted` (lower case) as the configuration files and the
/// postmaster's command line set them; absent names are not set anywhere readable.
pub fn read_settings(pgdata: &Path, wanted: &[&str]) -> HashMap<String, String> {
    read_settings_with_origin(pgdata, wanted)
        .into_iter()
        .map(|(k, (v, _))| (k, v))
        .collect()
}

/// Where the value in force of a setting comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A configuration file: postgresql.conf, a file it includes, postgresql.auto.conf.
    File(PathBuf),
    /// The postmaster's command line (postmaster.opts: `pg_ctl -o`, a service's options),
    /// which wins over every file, `ALTER SYSTEM`'s included.
    CommandLine,
}

/// As [`read_settings`], with where each value comes from.
pub fn read_settings_with_origin(
    pgdata: &Path,
    wanted: &[&str],
) -> HashMap<String, (String, Origin)> {
    let mut out = HashMap::new();
    let opts = std::fs::read_to_string(pgdata.join("postmaster.opts"))
        .map(|s| command_line_settings(&s))
        .unwrap_or_default();
    let config_file = opts
        .iter()
        .rev()
        .find(|(k, _)| k == "config_file")
        .map(|(_, v)| PathBuf::from(v))
        .unwrap_or_else(|| pgdata.join("postgresql.conf"));
    let mut all = Vec::new();
    read_file(&config_file, 0, &mut all);
    read_file(&pgdata.join("postgresql.auto.conf"), 0, &mut all);
    all.extend(opts.into_iter().map(|(k, v)| (k, v, Origin::CommandLine)));
    for (k, v, origin) in all {
        if wanted.contains(&k.as_str()) {
            out.insert(k, (v, origin));
        }
    }
    out
}

fn read_file(path: &Path, depth: usize, out: &mut Vec<(String, String, Origin)>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    for line in text.lines() {
        let Some((name, value)) = parse_line(line) else {
            continue;
        };
        match name.as_str() {
            "include" | "include_if_exists" => read_file(&dir.join(&value), depth + 1, out),
            "include_dir" => {
                let d = dir.join(&value);
                let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        let n = p.file_name().map(|n| n.to_string_lossy().into_owned());
                        n.is_some_and(|n| !n.starts_with('.') && n.ends_with(".conf"))
                    })
                    .collect();
                files.sort();
                for f in files {
                    read_file(&f, depth + 1, out);
                }
            }
            _ => out.push((name, value, Origin::File(path.to_path_buf()))),
        }
    }
}

/// A setting as SHOW prints it or a file writes it ("16MB", "60s", "0"; quotes allowed):
/// its number and its unit; `None` when it does not start with a number.
pub fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim().trim_matches('\'').trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    Some((digits.parse().ok()?, unit.trim()))
}

/// A time setting ("0", "500ms", "60s", "1min", "2h", "1d"); a bare number counts in
/// `unit`, the setting's own (seconds for `archive_timeout`, milliseconds for
/// `wal_sender_timeout`). `None` when it does not parse.
pub fn time_setting(text: &str, unit: std::time::Duration) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (n, u) = number_and_unit(text)?;
    let n32 = u32::try_from(n).ok();
    Some(match u {
        "" => unit.checked_mul(n32?)?,
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    })
}

/// `value` as a quoted configuration-file string, as `ALTER SYSTEM` writes it: quotes and
/// backslashes doubled (the configuration parser reads a backslash as an escape, so a
/// value holding one would otherwise change meaning).
pub fn quote(value: &str) -> String {
    let mut q = String::with_capacity(value.len() + 2);
    q.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            q.push(c);
        }
        q.push(c);
    }
    q.push('\'');
    q
}

/// The text of a configuration file with `set` in force: each line assigning one of the
/// names in `set`, or a name for which `drop` is true, is commented out with `note`, and
/// `set` is appended (after a `# note` line) as `name = 'value'` lines. Other lines, and
/// comments, are kept as they are. Names are compared case-insensitively.
pub fn replace_settings(
    text: &str,
    note: &str,
    drop: impl Fn(&str) -> bool,
    set: &[(&str, String)],
) -> String {
    let replaced = |name: &str| drop(name) || set.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut out = String::with_capacity(text.len() + 256);
    for line in text.lines() {
        match parse_line(line) {
            Some((name, _)) if replaced(&name) => {
                out += "# ";
                out += note;
                out += ", was: ";
                out += line;
            }
            _ => out += line,
        }
        out.push('\n');
    }
    out += "# ";
    out += note;
    out.push('\n');
    for (name, value) in set {
        out += name;
        out += " = ";
        out += &quote(value);
        out.push('\n');
    }
    out
}

/// `name = value` / `name value`, comments and quotes removed; None for blank lines,
/// comments and lines that do not parse.
fn parse_line(line: &str) -> Option<(String, String)> {
    let line = line.trim_start();
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(line.len());
    if name_end == 0 {
        return None;
    }
    let name = line[..name_end].to_ascii_lowercase();
    let mut rest = line[name_end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    let value = if let Some(quoted) = rest.strip_prefix('\'') {
        let mut v = String::new();
        let mut chars = quoted.chars().peekable();
        loop {
            match chars.next()? {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    v.push('\'');
                }
                '\'' => break,
                '\\' => v.push(chars.next()?),
                c => v.push(c),
            }
        }
        v
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        rest[..end].to_string()
    };
    Some((name, value))
}

/// `-c name=value` and `--name=value` pairs of postmaster.opts (arguments in double
/// quotes, as the postmaster writes them).
fn command_line_settings(opts: &str) -> Vec<(String, String)> {
    let args: Vec<String> = opts
        .split('"')
        .enumerate()
        .flat_map(|(i, part)| {
            if i % 2 == 1 {
                vec![part.to_string()]
            } else {
                part.split_whitespace().map(str::to_string).collect()
            }
        })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let pair = if args[i] == "-c" {
            i += 1;
            args.get(i).map(String::as_str)
        } else {
            args[i].strip_prefix("--")
        };
        if let Some((k, v)) = pair.and_then(|p| p.split_once('=')) {
            out.push((k.replace('-', "_").to_ascii_lowercase(), v.to_string()));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let p = |l: &str| parse_line(l);
        assert_eq!(
            p("recovery_prefetch = off"),
            Some(("recovery_prefetch".into(), "off".into()))
        );
        assert_eq!(
            p("  Recovery_Prefetch 'on'  # x"),
            Some(("recovery_prefetch".into(), "on".into()))
        );
        assert_eq!(
            p("restore_command = 'a ''b'' \\'c'"),
            Some(("restore_command".into(), "a 'b' 'c".into()))
        );
        assert_eq!(p("#recovery_prefetch = off"), None);
        assert_eq!(p("   "), None);
        assert_eq!(p("name = 'unterminated"), None);
        assert_eq!(p("x=1#c"), Some(("x".into(), "1".into())));
    }

    #[test]
    fn time_settings_read_in_every_unit() {
        use std::time::Duration;
        let s = Duration::from_secs(1);
        assert_eq!(time_setting("0", s), Some(Duration::ZERO));
        assert_eq!(time_setting("60", s), Some(Duration::from_secs(60)));
        assert_eq!(
            time_setting("60", Duration::from_millis(1)),
            Some(Duration::from_millis(60))
        );
        assert_eq!(time_setting("1min", s), Some(Duration::from_secs(60)));
        assert_eq!(time_setting("'90s'", s), Some(Duration::from_secs(90)));
        assert_eq!(time_setting("500ms", s), Some(Duration::from_millis(500)));
        assert_eq!(time_setting("2h", s), Some(Duration::from_secs(7200)));
        for bad in ["", "soon", "10 parsecs", "-1s"] {
            assert_eq!(time_setting(bad, s), None, "{bad}");
        }
        assert_eq!(number_and_unit("16MB"), Some((16, "MB")));
    }

    #[test]
    fn quoted_values_read_back_as_written() {
        for v in ["plain", "it's", "C:\\wal\\%f", "a\\'b", "", "x'' \\\\ y"] {
            let line = format!("restore_command = {}", quote(v));
            assert_eq!(
                parse_line(&line),
                Some(("restore_command".into(), v.into())),
                "{line}"
            );
        }
        assert_eq!(quote("a\\b'c"), "'a\\\\b''c'");
    }

    #[test]
    fn replacing_settings_comments_out_earlier_assignments_and_appends_ours() {
        let before = "# Do not edit this file manually!\n\
                      work_mem = '64MB'\n\
                      restore_command = 'cp /old/%f %p'\n\
                      Recovery_Target_Time = '2026-01-01 00:00:00+00'\n\
                      recovery_target_action = 'promote'\n\
                      #recovery_target_name = 'commented'\n";
        let after = replace_settings(
            before,
            "walvault restore 2026-12-02",
            |n| n.starts_with("recovery_target"),
            &[
                (
                    "restore_command",
                    "pullclient archive-get %f %p".to_string(),
                ),
                ("recovery_target_timeline", "latest".to_string()),
            ],
        );
        assert_eq!(
            after,
            "# Do not edit this file manually!\n\
             work_mem = '64MB'\n\
             # walvault restore 2026-12-02, was: restore_command = 'cp /old/%f %p'\n\
             # walvault restore 2026-12-02, was: Recovery_Target_Time = '2026-01-01 00:00:00+00'\n\
             # walvault restore 2026-12-02, was: recovery_target_action = 'promote'\n\
             #recovery_target_name = 'commented'\n\
             # walvault restore 2026-12-02\n\
             restore_command = 'pullclient archive-get %f %p'\n\
             recovery_target_timeline = 'latest'\n"
        );
        // What PostgreSQL would read from the result: only ours.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgresql.auto.conf"), &after).unwrap();
        let s = read_settings(
            dir.path(),
            &[
                "restore_command",
                "recovery_target_time",
                "recovery_target_action",
                "work_mem",
            ],
        );
        assert_eq!(s["restore_command"], "pullclient archive-get %f %p");
        assert_eq!(s["work_mem"], "64MB");
        assert!(!s.contains_key("recovery_target_time"), "{s:?}");
        assert!(!s.contains_key("recovery_target_action"), "{s:?}");
        // A second restore over the first replaces ours too, so nothing stacks up.
        let again = replace_settings(
            &after,
            "second",
            |_| false,
            &[("restore_command", "x".into())],
        );
        assert_eq!(again.matches("\nrestore_command = ").count(), 1, "{again}");
    }

    #[test]
    fn files_includes_auto_conf_and_command_line_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(
            d.join("postgresql.conf"),
            "recovery_prefetch = on\nmaintenance_io_concurrency = 20\n\
             include 'extra.conf'\ninclude_if_exists 'missing.conf'\ninclude_dir 'conf.d'\n",
        )
        .unwrap();
        std::fs::write(d.join("extra.conf"), "maintenance_io_concurrency = 30\n").unwrap();
        std::fs::write(d.join("conf.d/b.conf"), "recovery_prefetch = try\n").unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "recovery_prefetch = off\n").unwrap();
        std::fs::write(d.join("conf.d/.hidden.conf"), "recovery_prefetch = x\n").unwrap();
        let want = ["recovery_prefetch", "maintenance_io_concurrency"];
        let s = read_settings(d, &want);
        assert_eq!(s["recovery_prefetch"], "try");
        assert_eq!(s["maintenance_io_concurrency"], "30");
        std::fs::write(
            d.join("postgresql.auto.conf"),
            "recovery_prefetch = 'off'\n",
        )
        .unwrap();
        assert_eq!(read_settings(d, &want)["recovery_prefetch"], "off");
        std::fs::write(
            d.join("postmaster.opts"),
            "/usr/lib/postgresql/15/bin/postgres \"-D\" \"/x\" \"-c\" \"recovery_prefetch=on\" \"--maintenance-io-concurrency=5\"\n",
        )
        .unwrap();
        let s = read_settings(d, &want);
        assert_eq!(s["recovery_prefetch"], "on");
        assert_eq!(s["maintenance_io_concurrency"], "5");
    }

    #[test]
    fn config_file_named_on_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::fs::write(etc.join("postgresql.conf"), "recovery_prefetch = off\n").unwrap();
        std::fs::write(
            dir.path().join("postmaster.opts"),
            format!(
                "/usr/bin/postgres \"-D\" \"/d\" \"-c\" \"config_file={}\"\n",
                etc.join("postgresql.conf").display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("postgresql.conf"),
            "recovery_prefetch = on\n",
        )
        .unwrap();
        assert_eq!(
            read_settings(dir.path(), &["recovery_prefetch"])["recovery_prefetch"],
            "off"
        );
    }
}
