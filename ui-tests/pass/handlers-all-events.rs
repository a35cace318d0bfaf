// One `#[on(..)]` handler for each of the eight events, each with the parameters of its event.
// A healthy run raises all but `error`: the worker listens, reports, and exits when the primary
// disconnects.
use std::sync::atomic::{AtomicU32, Ordering};

use cluster::net::{ListenAddress, TcpListener};
use cluster::{ExitStatus, Primary, Settings, WorkerRef};

/// The events seen, one bit each.
static SEEN: AtomicU32 = AtomicU32::new(0);

const SETUP: u32 = 1 << 0;
const FORK: u32 = 1 << 1;
const ONLINE: u32 = 1 << 2;
const LISTENING: u32 = 1 << 3;
const MESSAGE: u32 = 1 << 4;
const DISCONNECT: u32 = 1 << 5;
const EXIT: u32 = 1 << 6;
const ERROR: u32 = 1 << 7;

fn saw(event: u32) {
    SEEN.fetch_or(event, Ordering::SeqCst);
}

#[cluster::message]
struct Listening {
    port: u16,
}

#[cluster::main(workers = 1, messages(to_primary = Listening))]
async fn main() {
    #[primary(cluster)]
    {
        #[on(setup)]
        async fn on_setup(_: &Primary<Listening>, settings: Settings) {
            assert!(!settings.silent);
            saw(SETUP);
        }

        #[on(fork)]
        async fn on_fork(_: &Primary<Listening>, worker: WorkerRef) {
            assert_eq!(worker.id(), 1);
            saw(FORK);
        }

        #[on(online)]
        async fn on_online(_: &Primary<Listening>, worker: WorkerRef) {
            assert_eq!(worker.id(), 1);
            saw(ONLINE);
        }

        #[on(listening)]
        async fn on_listening(_: &Primary<Listening>, _: WorkerRef, address: ListenAddress) {
            assert_ne!(address.socket_addr().map(|a| a.port()), Some(0));
            saw(LISTENING);
        }

        #[on(message)]
        async fn on_message(cluster: &Primary<Listening>, _: WorkerRef, msg: Listening) {
            assert_ne!(msg.port, 0);
            saw(MESSAGE);
            // Completes once the worker exited; its last events stay queued for the loop.
            cluster.disconnect().await;
        }

        #[on(disconnect)]
        async fn on_disconnect(_: &Primary<Listening>, worker: WorkerRef) {
            assert_eq!(worker.id(), 1);
            saw(DISCONNECT);
        }

        #[on(exit)]
        async fn on_exit(
            _: &Primary<Listening>,
            _: WorkerRef,
            status: ExitStatus,
        ) -> Result<(), String> {
            saw(EXIT);
            if status.success() {
                Ok(())
            } else {
                Err(format!("worker exited with {status}"))
            }
        }

        #[on(error)]
        async fn on_error(
            _: &Primary<Listening>,
            worker: Option<WorkerRef>,
            error: cluster::Error,
        ) {
            eprintln!("error from {:?}: {error}", worker.map(|w| w.id()));
            saw(ERROR);
        }

        // Queues the `setup` event before the loop starts.
        cluster.setup_primary(|s| s.silent = false).await;
    }
    #[worker(worker)]
    {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        worker.send(&Listening { port }).await.unwrap();
        // Until the primary disconnects.
        while worker.recv().await.is_some() {}
    }
    if cluster::is_primary() {
        let seen = SEEN.load(Ordering::SeqCst);
        let all = SETUP | FORK | ONLINE | LISTENING | MESSAGE | DISCONNECT | EXIT;
        assert_eq!(seen, all, "events seen: {seen:#b}");
    }
}
