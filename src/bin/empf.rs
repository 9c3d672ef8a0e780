fn main() {
    println!("empf {}", env!("CARGO_PKG_VERSION"));
}
