#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = lazyblk::cli::Cli::parse();
    match lazyblk::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyblk: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
