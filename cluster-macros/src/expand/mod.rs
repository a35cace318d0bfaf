//! The entry points, each in three stages: parse (`model`, `args`), `validate`, expand.

pub mod main;
pub mod message;

use proc_macro2::TokenStream;

use crate::errors::Failure;
use crate::model::{MainInput, MessageInput};
use crate::validate;

pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    try_main(args, item).unwrap_or_else(Failure::into_tokens)
}

fn try_main(args: TokenStream, item: TokenStream) -> Result<TokenStream, Failure> {
    let input = MainInput::parse(args, item)?;
    let valid = validate::main(input).map_err(main::recover)?;
    Ok(main::expand(&valid))
}

pub fn message(args: TokenStream, item: TokenStream) -> TokenStream {
    try_message(args, item).unwrap_or_else(Failure::into_tokens)
}

fn try_message(args: TokenStream, item: TokenStream) -> Result<TokenStream, Failure> {
    let input = MessageInput::parse(args, item)?;
    let valid = validate::message(input).map_err(message::recover)?;
    Ok(message::expand(&valid))
}
