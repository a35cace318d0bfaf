// Independent mistakes are reported together, in one build.
#[cluster::main(workers = 0, threads = 4)]
fn main(port: u16) {
    #[primary]
    {
        let _ = port;
    }
}
