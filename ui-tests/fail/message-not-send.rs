use std::marker::PhantomData;

#[cluster::message]
struct ToPrimary {
    value: u32,
    #[serde(skip)]
    not_send: PhantomData<*const u8>,
}

#[cluster::main(workers = 1, messages(to_primary = ToPrimary))]
async fn main() {
    #[primary]
    {}
    #[worker(worker)]
    {
        let _ = worker.send(&ToPrimary {
            value: 1,
            not_send: PhantomData,
        });
    }
}
