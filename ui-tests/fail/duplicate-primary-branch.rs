#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        cluster.disconnect().await;
    }
    #[primary(again)]
    {
        again.disconnect().await;
    }
    #[worker]
    {}
}
