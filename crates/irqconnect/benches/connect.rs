//! Connect + disconnect with 1,000 live connections.
fn main() {}
