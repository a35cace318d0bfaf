//! Procedural macros of the `cluster` crate. Use them through `cluster`: `#[cluster::main]`
//! and `#[cluster::message]`; the expansions name only `::cluster::__private`.
#![forbid(unsafe_code)]

mod args;
mod expand;
mod model;
mod paths;

use proc_macro::TokenStream;

/// See `cluster::main`.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::main::expand(args.into(), item.into()).into()
}

/// See `cluster::message`.
#[proc_macro_attribute]
pub fn message(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::message::expand(args.into(), item.into()).into()
}
