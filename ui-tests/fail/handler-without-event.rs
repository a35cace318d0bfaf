#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on]
        async fn on_anything(_: &cluster::Primary) {}
    }
    #[worker]
    {}
}
