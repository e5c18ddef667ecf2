//! One configuration style for every binary: a TOML file, then the
//! environment, then flags, all typed and checked at start.
//!
//! The collector's file has its own shape (`collector/src/config.rs`:
//! nested tables, `deny_unknown_fields`, `TALLY_*` overrides). The other
//! binaries (aggregator, billing-api, tally) read theirs through
//! [`parse`]: `--config FILE` (or `TALLY_CONFIG`) names a TOML file whose
//! keys are the command's long flag names without the dashes
//! (`clickhouse-url = "http://…"`, `shutdown-timeout-secs = 10`, arrays for
//! list flags). Each value becomes that flag's default, so a `TALLY_*`
//! variable overrides the file and a flag overrides both. One file serves
//! all of a binary's subcommands, each taking the keys it has flags for; a
//! key that is a flag of none is refused with the file and the key named
//! (a typo never passes silently). A value goes through the flag's own
//! parser, so a wrong type is refused with the flag named, as on the
//! command line.

use clap::{ArgMatches, Command, CommandFactory, FromArgMatches};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The flag (and variable) that names the file.
pub const CONFIG_FLAG: &str = "config";
pub const CONFIG_ENV: &str = "TALLY_CONFIG";

/// Parses the process's arguments into `T`, with the file's values
/// beneath the environment and the flags. Exits with clap's message (and
/// status 2) on any error, as `T::parse()` would.
pub fn parse<T: CommandFactory + FromArgMatches>() -> T {
    match try_parse_from::<T>(std::env::args_os()) {
        Ok(t) => t,
        Err(e) => e.exit(),
    }
}

/// [`parse`] over `args` (the first is the program name).
pub fn try_parse_from<T: CommandFactory + FromArgMatches>(
    args: impl IntoIterator<Item = impl Into<OsString> + Clone>,
) -> Result<T, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let cmd = with_config_flag(T::command());
    // First pass, leniently: which file, which subcommand.
    let first = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&args)?;
    let path = config_path(&first);
    let mut cmd = cmd;
    if let Some(path) = path {
        let table = read_table(&mut cmd, &path)?;
        let sub = first.subcommand_name().map(str::to_owned);
        cmd = apply(cmd, sub.as_deref(), &path, table)?;
    }
    let matches = cmd.try_get_matches_from(&args)?;
    T::from_arg_matches(&matches)
}

fn with_config_flag(cmd: Command) -> Command {
    cmd.arg(
        clap::Arg::new(CONFIG_FLAG)
            .long(CONFIG_FLAG)
            .env(CONFIG_ENV)
            .global(true)
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML file of settings (keys: the long flag names); the environment and flags override it"),
    )
}

fn config_path(m: &ArgMatches) -> Option<PathBuf> {
    let mut m = m;
    loop {
        if let Ok(Some(p)) = m.try_get_one::<PathBuf>(CONFIG_FLAG) {
            return Some(p.clone());
        }
        match m.subcommand() {
            Some((_, sub)) => m = sub,
            None => return None,
        }
    }
}

fn read_table(cmd: &mut Command, path: &Path) -> Result<toml::Table, clap::Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        cmd.error(
            clap::error::ErrorKind::Io,
            format!("--config {}: {e}", path.display()),
        )
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        cmd.error(
            clap::error::ErrorKind::InvalidValue,
            format!("--config {}: {e}", path.display()),
        )
    })
}

/// Makes each key of `table` the default of the flag of that long name on
/// the subcommand `sub` (or the command itself).
fn apply(
    cmd: Command,
    sub: Option<&str>,
    path: &Path,
    table: toml::Table,
) -> Result<Command, clap::Error> {
    let mut err_cmd = cmd.clone();
    let target = match sub {
        Some(s) => cmd
            .find_subcommand(s)
            .cloned()
            .expect("the subcommand just parsed"),
        None => cmd.clone(),
    };
    let mut defaults: Vec<(String, Vec<String>)> = Vec::new();
    let named = |c: &Command, key: &str| {
        c.get_arguments()
            .find(|a| a.get_long() == Some(key) && a.get_id() != CONFIG_FLAG)
            .map(|a| a.get_id().as_str().to_owned())
    };
    for (key, value) in table {
        // One file serves every subcommand of a binary: a key is refused
        // only when no command of the binary has that flag, and applied
        // where the command run has it.
        let known =
            named(&cmd, &key).is_some() || cmd.get_subcommands().any(|c| named(c, &key).is_some());
        if !known {
            return Err(err_cmd.error(
                clap::error::ErrorKind::UnknownArgument,
                format!(
                    "--config {}: unknown key {key:?} (no flag --{key} in {})",
                    path.display(),
                    cmd.get_name()
                ),
            ));
        }
        let Some(id) = named(&target, &key) else {
            continue;
        };
        let values = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<Vec<_>>>(),
            v => scalar(&v).map(|s| vec![s]),
        }
        .ok_or_else(|| {
            err_cmd.error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "--config {}: {key}: a string, number, boolean or array of them",
                    path.display()
                ),
            )
        })?;
        defaults.push((id, values));
    }
    let set = move |mut c: Command| {
        for (id, values) in &defaults {
            let values: Vec<&'static str> = values
                .iter()
                // Start-up configuration, set once per process.
                .map(|v| &*Box::leak(v.clone().into_boxed_str()))
                .collect();
            c = c.mut_arg(id.as_str(), |a| a.default_values(values.clone()));
        }
        c
    };
    Ok(match sub {
        Some(s) => cmd.mut_subcommand(s, set),
        None => set(cmd),
    })
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Run {
            #[arg(long, env = "TALLY_TEST_CFG_URL", default_value = "http://default")]
            url: String,
            #[arg(long, env = "TALLY_TEST_CFG_SECS", default_value_t = 30)]
            secs: u64,
            #[arg(long, value_delimiter = ',')]
            keys: Vec<String>,
            #[arg(long)]
            verbose: bool,
        },
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tally.toml");
        std::fs::write(&p, text).unwrap();
        (d, p.display().to_string())
    }

    fn run(args: &[&str]) -> Result<(String, u64, Vec<String>, bool), String> {
        let cli: Cli = try_parse_from::<Cli>(args.iter().copied()).map_err(|e| e.to_string())?;
        let Cmd::Run {
            url,
            secs,
            keys,
            verbose,
        } = cli.command;
        Ok((url, secs, keys, verbose))
    }

    /// File, then environment, then flags; every value typed; unknown keys
    /// and wrong types refused with the key or flag named. (One test: the
    /// environment is the process's.)
    #[test]
    fn file_then_environment_then_flags() {
        let (_d, p) =
            file("url = \"http://from-file\"\nsecs = 5\nkeys = [\"a\", \"b\"]\nverbose = true\n");
        assert_eq!(
            run(&["x", "run", "--config", &p]).unwrap(),
            (
                "http://from-file".into(),
                5,
                vec!["a".into(), "b".into()],
                true
            )
        );
        // Without a file: the built-in defaults.
        assert_eq!(
            run(&["x", "run"]).unwrap(),
            ("http://default".into(), 30, vec![], false)
        );
        // A flag overrides the file.
        assert_eq!(
            run(&["x", "run", "--config", &p, "--secs", "7"]).unwrap().1,
            7
        );
        // The environment overrides the file, a flag the environment.
        std::env::set_var("TALLY_TEST_CFG_URL", "http://from-env");
        assert_eq!(
            run(&["x", "run", "--config", &p]).unwrap().0,
            "http://from-env"
        );
        assert_eq!(
            run(&["x", "run", "--config", &p, "--url", "http://flag"])
                .unwrap()
                .0,
            "http://flag"
        );
        std::env::remove_var("TALLY_TEST_CFG_URL");
        // The file named by TALLY_CONFIG.
        std::env::set_var(CONFIG_ENV, &p);
        assert_eq!(run(&["x", "run"]).unwrap().1, 5);
        std::env::remove_var(CONFIG_ENV);

        let (_d2, bad) = file("ulr = \"typo\"\n");
        let e = run(&["x", "run", "--config", &bad]).unwrap_err();
        assert!(e.contains("unknown key \"ulr\"") && e.contains(&bad), "{e}");
        let (_d3, typed) = file("secs = \"soon\"\n");
        let e = run(&["x", "run", "--config", &typed]).unwrap_err();
        assert!(e.contains("--secs"), "{e}");
        let e = run(&["x", "run", "--config", "/nonexistent/tally.toml"]).unwrap_err();
        assert!(e.contains("/nonexistent/tally.toml"), "{e}");
    }
}
