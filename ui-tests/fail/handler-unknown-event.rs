#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(nonsense)]
        async fn on_nonsense(_: &cluster::Primary) {}
    }
    #[worker]
    {}
}
