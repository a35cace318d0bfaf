#[derive(Debug)]
enum ToPrimary {
    Hello,
}

#[cluster::main(workers = 1, messages(to_primary = ToPrimary))]
async fn main() {
    #[primary]
    {}
    #[worker(worker)]
    {
        let _ = worker.send(&ToPrimary::Hello);
    }
}
