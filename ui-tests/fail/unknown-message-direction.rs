#[cluster::message]
enum Note {
    Hello,
}

#[cluster::main(workers = 1, messages(to_primary = Note, to_workers = Note))]
async fn main() {
    #[primary]
    {}
    #[worker]
    {}
}
