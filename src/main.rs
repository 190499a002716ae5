//! The `adamcu` command line: one subcommand per job; the work lives in the library.

use adamcu::config::{parse_device, Config};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "adamcu", version, about = "Active domain adaptation for semantic segmentation \
    with multi-level contrastive units (ADA-MCU)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print versions and the device, then run a smoke check (a few SGD steps) on that device.
    Doctor {
        /// "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Pipeline config files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config: print it resolved, or every error (exit code 2).
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor { device } => match parse_device(&device) {
            Some(choice) => adamcu::doctor::run(choice.resolve()),
            None => Err(anyhow::anyhow!("--device {device:?}: expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")),
        },
        Command::Config(ConfigCommand::Check { file }) => match Config::load(&file) {
            Ok(config) => {
                print!("{}", toml::to_string_pretty(&config).expect("config serialises"));
                Ok(())
            }
            Err(errors) => {
                eprint!("{errors}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
