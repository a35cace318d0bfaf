extern crate cluster as my_cluster;

#[my_cluster::message(crate = "my_cluster")]
enum ToPrimary {
    Hello(u8),
}

#[my_cluster::main(crate = "my_cluster", workers = 1, messages(to_primary = ToPrimary))]
async fn main() {
    #[primary(cluster)]
    {
        while let Some(event) = cluster.next_event().await {
            if let my_cluster::Event::Message {
                msg: ToPrimary::Hello(n),
                ..
            } = event
            {
                assert_eq!(n, 42);
                break;
            }
        }
        cluster.disconnect().await;
    }
    #[worker(worker)]
    {
        worker.send(&ToPrimary::Hello(42)).await.unwrap();
    }
}
