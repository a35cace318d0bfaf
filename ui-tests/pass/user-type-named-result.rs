// The user's names must not capture the expansion's: every emitted path is absolute. (Not
// primitive types such as `struct u64;`: serde's derives do not survive those.)
#![allow(dead_code)]

struct Result;
struct Option;
struct Some;
struct None;
struct Ok;
struct Err;
struct Box;
struct Default;
struct Future;
type Vec = ();
struct String;
mod core {}
mod std {}
// The expansion names `::cluster`, which a local module does not shadow.
mod cluster {}

#[::cluster::message]
enum ToPrimary {
    Done(u32),
}

#[::cluster::main(workers = 1, messages(to_primary = ToPrimary))]
async fn main() {
    #[primary(cluster)]
    {
        #[on(message)]
        async fn on_message(
            cluster: &::cluster::Primary<ToPrimary>,
            _: ::cluster::WorkerRef,
            msg: ToPrimary,
        ) {
            let ToPrimary::Done(n) = msg;
            ::std::assert_eq!(n, 1);
            cluster.disconnect().await;
        }
    }
    #[worker(worker)]
    {
        worker.send(&ToPrimary::Done(1)).await.unwrap();
    }
}
