//! Collecting errors across the stages, and what an expansion that failed still emits.
//!
//! Like serde's `Ctxt`: each stage pushes the independent mistakes it finds and goes on, so one
//! build reports them all; they are combined into one [`syn::Error`] at the end.

use proc_macro2::TokenStream;
use quote::quote;
use syn::Error;

/// The errors found so far, combined in the order they were found.
#[derive(Default)]
pub struct Errors(Option<Error>);

impl Errors {
    pub fn push(&mut self, e: Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// `self`'s errors, then `later`'s.
    pub fn then(mut self, later: Errors) -> Errors {
        if let Some(e) = later.0 {
            self.push(e);
        }
        self
    }

    pub fn into_error(self) -> Option<Error> {
        self.0
    }
}

/// A failed expansion: the errors, and the tokens to emit after them. Those keep the user's
/// item alive (a `fn main`, a type with its derives), so the errors are not followed by others
/// that only say the item is gone.
pub struct Failure {
    pub error: Error,
    pub tokens: TokenStream,
}

impl Failure {
    pub fn into_tokens(self) -> TokenStream {
        let error = self.error.to_compile_error();
        let tokens = self.tokens;
        quote!(#error #tokens)
    }
}

/// What `validate` returns for an invalid input: the errors, and what is left to expand.
pub struct Invalid<R> {
    pub error: Error,
    pub recovery: R,
}
