// The types the body uses are unknown, so the body is not expanded with a default in their
// place: the one error is the argument's, none follows from it.
#[cluster::message]
struct Hello;

#[cluster::main(workers = 1, message(to_primary = Hello))]
async fn main() {
    #[primary]
    {}
    #[worker(worker)]
    {
        worker.send(&Hello).unwrap();
    }
}
