//! Who we run as: the password database entry of a uid, looked up with the re-entrant
//! `getpwuid_r` (never `getpwuid`, whose static buffer another thread of a multi-thread
//! runtime can overwrite while we copy out of it).
//!
//! The user is the effective uid's, as libpq's default user name is and as PostgreSQL's
//! `peer` authentication sees the process.

use std::ffi::CStr;
use std::path::PathBuf;

/// A password database entry, copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserEntry {
    /// Login name.
    pub name: String,
    /// Home directory.
    pub home: PathBuf,
}

/// The entry of `uid`, or None when the password database has none (or cannot be read).
pub fn user_by_uid(uid: libc::uid_t) -> Option<UserEntry> {
    // sysconf gives a hint, not a limit: grow the buffer on ERANGE.
    // SAFETY: sysconf has no preconditions.
    let hint = unsafe { libc::sysconf(libc::_SC_GETPW_R_SIZE_MAX) };
    let mut size = usize::try_from(hint).unwrap_or(1024).clamp(256, 1 << 16);
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids); it is
        // only read after getpwuid_r filled it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to live, writable storage of the stated size; the
        // strings it sets point into `buf`, which outlives the reads below.
        let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), size, &mut result) };
        if rc == libc::ERANGE && size < (1 << 20) {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        // SAFETY: getpwuid_r succeeded, so pw_name (checked non-null) and pw_dir (when
        // non-null) are NUL-terminated strings inside `buf`.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        let home = if pwd.pw_dir.is_null() {
            PathBuf::new()
        } else {
            // SAFETY: as above.
            PathBuf::from(
                unsafe { CStr::from_ptr(pwd.pw_dir) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        return Some(UserEntry { name, home });
    }
}

/// The entry of the effective uid.
pub fn current_user() -> Option<UserEntry> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    user_by_uid(unsafe { libc::geteuid() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_current_user_are_found_and_an_unknown_uid_is_not() {
        let root = user_by_uid(0).expect("uid 0 has an entry");
        assert_eq!(root.name, "root");
        assert!(root.home.is_absolute(), "{root:?}");
        let me = current_user().expect("the effective uid has an entry");
        // SAFETY: geteuid cannot fail.
        assert_eq!(user_by_uid(unsafe { libc::geteuid() }), Some(me.clone()));
        assert!(!me.name.is_empty());
        assert_eq!(user_by_uid(4_000_000_000), None);
    }

    #[test]
    fn lookups_from_many_threads_agree() {
        let expected = user_by_uid(0);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    (0..200)
                        .map(|_| user_by_uid(if i % 2 == 0 { 0 } else { 4_000_000_000 }))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            for got in t.join().expect("thread") {
                if i % 2 == 0 {
                    assert_eq!(got, expected);
                } else {
                    assert_eq!(got, None);
                }
            }
        }
    }
}
