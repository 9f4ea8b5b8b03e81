//! msl-demo: the SFT III failure scenarios on a real msld pair, narrated.

fn main() {
    eprintln!("msl-demo: not written yet");
    std::process::exit(2);
}
