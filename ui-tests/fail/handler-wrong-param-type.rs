#[cluster::main(workers = 1)]
async fn main() {
    #[primary(cluster)]
    {
        #[on(listening)]
        async fn on_listening(_: &cluster::Primary, _: cluster::WorkerRef, port: u16) {
            println!("listening on {port}");
        }
    }
    #[worker]
    {}
}
