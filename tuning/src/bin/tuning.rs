//! `tuning check [--sysctl] [--profile NAME|FILE]` · `tuning show PROFILE`
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tuning",
    about = "Configuration profiles and host checks for the mesh data plane"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the host's relevant settings with recommended values and why.
    Check {
        /// Print only the commands that apply the recommendations not met.
        #[arg(long)]
        sysctl: bool,
        /// Recommendations for this profile (built-in name or file), e.g. the PM QoS CPU
        /// latency request `latency` holds.
        #[arg(long, default_value = "default")]
        profile: String,
    },
    /// Print a profile (built-in name or file) with every knob resolved.
    Show { profile: String },
    /// List the built-in profiles.
    List,
}

fn main() -> std::process::ExitCode {
    match Args::parse().cmd {
        Cmd::Check { sysctl, profile } => {
            let p = match tuning::load_profile(&profile) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            let f = tuning::check::run_for(&p);
            if sysctl {
                print!("{}", tuning::check::fixes(&f));
            } else {
                print!("{}", tuning::check::render(&f));
            }
        }
        Cmd::Show { profile } => match tuning::load_profile(&profile) {
            Ok(p) => print!(
                "{}",
                serde_norway::to_string(&p).expect("profile serializes")
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        Cmd::List => {
            for (n, text) in tuning::PROFILES {
                println!(
                    "{n:<18} {}",
                    text.lines().next().unwrap_or("").trim_start_matches("# ")
                );
            }
        }
    }
    std::process::ExitCode::SUCCESS
}
