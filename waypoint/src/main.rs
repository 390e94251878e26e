//! `waypoint`: see [`waypoint::cli`].

fn main() -> std::process::ExitCode {
    waypoint::cli::main_with_args(std::env::args_os().collect())
}
