#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        cluster.disconnect().await;
    }
    #[worker]
    {}
}
