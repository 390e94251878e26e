//! `ztunnel`: see [`ztunnel::cli`].

fn main() -> std::process::ExitCode {
    ztunnel::cli::main_with_args(std::env::args_os().collect())
}
