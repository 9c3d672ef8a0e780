use clap::Parser;

fn main() {
    let cli = empf::cli::Cli::parse();
    if let Err(e) = empf::cli::run(cli) {
        eprintln!("error: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
