#[cluster::message]
enum ToPrimary {
    Hello,
}

#[cluster::main(workers = 1, messages = ToPrimary)]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
