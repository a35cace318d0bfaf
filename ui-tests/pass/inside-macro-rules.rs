// Both attributes applied to tokens that come from a `macro_rules!` expansion.
macro_rules! cluster_app {
    ($msg:ident, $value:expr) => {
        #[cluster::message]
        struct $msg(u32);

        #[cluster::main(workers = 1, messages(to_primary = $msg))]
        async fn main() {
            #[primary(cluster)]
            {
                #[on(message)]
                async fn on_message(
                    cluster: &cluster::Primary<$msg>,
                    _: cluster::WorkerRef,
                    msg: $msg,
                ) {
                    assert_eq!(msg.0, $value);
                    cluster.disconnect().await;
                }
            }
            #[worker(worker)]
            {
                worker.send(&$msg($value)).await.unwrap();
            }
        }
    };
}

cluster_app!(Count, 3);
