//! `l4fwd --config FILE`: the runtime's L4 forwarder as a process.
fn main() -> std::process::ExitCode {
    runtime::forwarder::main_with_args(std::env::args())
}
