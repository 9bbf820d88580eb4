//! Progress of long operations (backup, restore): a bar on a terminal, nothing otherwise.
//!
//! DESIGN: long operations show progress on a terminal and stay quiet in logs. The bar
//! is drawn on stderr only when stderr is a terminal; elsewhere (a service, a pipe, a
//! test) it is hidden and every call on it is a no-op.

use std::io::IsTerminal;

/// A byte-counting bar for `operation` ("backup", "restore") over `total` bytes; a total
/// of 0 (unknown) gives a spinner with the same counters.
pub fn byte_bar(operation: &str, total: u64) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = if total > 0 {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{operation} {{bar:40}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}
