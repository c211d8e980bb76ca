//! Configuration (PROTOCOL.md §6): `config::parse` on an argv of arbitrary strings, and with
//! `--config` naming a file of arbitrary TOML text, which goes through the same reading, TOML
//! parsing and flag merging as `switchyard serve --config FILE`.
//!
//! Errors are expected (clap's, TOML's, validation's); a panic is not. An accepted
//! configuration must pass `validate` and, when it is a dev node, listen on loopback.
//!
//! Input: byte 0 odd means a file is given. The rest is split at NUL bytes: the TOML text first
//! if there is a file, then the arguments.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use switchyard::config::{CliCommand, parse};

/// One file per process, rewritten for every input.
static FILE: LazyLock<PathBuf> = LazyLock::new(|| {
    // The environment is one of the sources `parse` reads; start from none of it.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHYARD_") {
            // SAFETY: this runs once, before anything else in the process reads the environment.
            unsafe { std::env::remove_var(name) };
        }
    }
    std::env::temp_dir().join(format!("switchyard-fuzz-config-{}.toml", std::process::id()))
});

/// `--help` and `--version` print and exit the process, as they should for the binary; a fuzz
/// target cannot continue after that, so such argument lists are skipped. So are `--config`
/// flags of the fuzzer's own: the target gives the file, and reading `/dev/zero` would never end.
fn skipped(arg: &str) -> bool {
    arg.starts_with("--config")
        || arg == "help"
        || arg.starts_with("--help")
        || arg.starts_with("--version")
        || (arg.starts_with('-') && !arg.starts_with("--") && (arg.contains('h') || arg.contains('V')))
}

fuzz_target!(|data: &[u8]| {
    let file_path = &*FILE;
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(pieces) = rest.split(|&b| b == 0).map(std::str::from_utf8).collect::<Result<Vec<&str>, _>>() else {
        return;
    };
    let (file, args) = match pieces.split_first() {
        Some((text, args)) if mode % 2 == 1 => (Some(*text), args),
        _ => (None, &pieces[..]),
    };
    if args.iter().any(|a| skipped(a)) {
        return;
    }
    let mut argv: Vec<String> = vec!["switchyard".into()];
    if let Some(text) = file {
        std::fs::write(file_path, text).unwrap();
        argv.extend(["serve".into(), "--config".into(), file_path.display().to_string()]);
    }
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    if let Ok(cli) = parse(&argv) {
        let CliCommand::Serve(args) = &cli.command;
        args.validate().expect("parse answers only valid configurations");
        assert!(!args.dev_mode() || args.listen.ip().is_loopback(), "a dev node listens on loopback only");
    }
});
