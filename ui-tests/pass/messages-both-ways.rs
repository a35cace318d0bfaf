use cluster::Event;

#[cluster::message]
#[derive(Debug, PartialEq)]
enum ToWorker {
    Ping(u32),
}

#[cluster::message]
#[derive(Debug, PartialEq)]
struct ToPrimary {
    pong: u32,
    from: String,
}

#[cluster::main(workers = 1, messages(to_primary = ToPrimary, to_worker = ToWorker))]
async fn main() {
    #[primary(cluster)]
    {
        while let Some(event) = cluster.next_event().await {
            match event {
                Event::Online { worker } => worker.send(&ToWorker::Ping(7)).await.unwrap(),
                Event::Message { msg, .. } => {
                    assert_eq!(msg.pong, 7);
                    assert_eq!(msg.from, "worker 1");
                    break;
                }
                Event::Exit { status, .. } => panic!("worker exited early: {status}"),
                _ => {}
            }
        }
        cluster.disconnect().await;
    }
    #[worker(worker)]
    {
        let Some(ToWorker::Ping(n)) = worker.recv().await else {
            panic!("no ping");
        };
        worker
            .send(&ToPrimary {
                pong: n,
                from: format!("worker {}", worker.id()),
            })
            .await
            .unwrap();
    }
}
