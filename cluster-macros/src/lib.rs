//! Procedural macros of the `cluster` crate. Use them through `cluster`: `#[cluster::main]`
//! and `#[cluster::message]`; the expansions name only `::cluster::__private`.
//!
//! Each goes through three stages, like thiserror's: parse the arguments (`args`) and the item
//! (`model`) into typed values, `validate` them, then `expand`. The stages collect errors
//! (`errors`) rather than stop at the first, and a failed expansion still emits the user's item,
//! expanded with defaults where only the arguments are wrong.
#![forbid(unsafe_code)]

mod args;
mod errors;
mod expand;
mod model;
mod paths;
mod validate;

use proc_macro::TokenStream;

/// See `cluster::main`.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::main(args.into(), item.into()).into()
}

/// See `cluster::message`.
#[proc_macro_attribute]
pub fn message(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::message(args.into(), item.into()).into()
}
