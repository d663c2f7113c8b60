//! Placeholder until the gitfront issue: refuses everything with a clear reason.
fn main() {
    eprintln!("gitfront: not implemented yet");
    std::process::exit(1);
}
