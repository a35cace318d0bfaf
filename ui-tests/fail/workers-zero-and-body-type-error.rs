// Only an argument is wrong: the body is still expanded, with `workers` at its default, so its
// own type error is reported in the same build, and no other.
#[cluster::main(workers = 0)]
async fn main() {
    #[primary(cluster)]
    {
        let port: u16 = "8080";
        println!("port {port}");
        cluster.disconnect().await;
    }
    #[worker]
    {}
}
