#[cluster::main(workers = 1)]
async fn main<T: Default>() {
    #[primary]
    {
        let _ = T::default();
    }
    #[worker]
    {}
}
