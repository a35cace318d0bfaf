//! Whether the parsed input makes a valid `main` or message, and what is left to expand when it
//! does not.
//!
//! Every check runs, so independent mistakes are reported together, the arguments' before the
//! body's, each on the tokens it is about.

use syn::{Error, Ident, Item, Path, Signature};

use crate::args::{MainArgs, Workers};
use crate::errors::{Errors, Invalid};
use crate::model::{Body, Branch, Handler, MainInput, MessageInput, Part, Role};

/// A valid `#[cluster::main]`: its arguments, absent where the default applies, and its body.
pub struct Main {
    pub args: MainArgs,
    pub body: Body,
}

/// What an invalid `main` still expands to.
pub enum MainRecovery {
    /// Only the arguments are wrong: the body, with defaults for them, so that it is still
    /// type-checked and the user sees its real errors too.
    Defaults(Box<Main>),
    /// The body is wrong, or the types it was written against are unknown: a stub `fn main`.
    Stub(Box<Body>),
}

pub fn main(input: MainInput) -> Result<Main, Invalid<MainRecovery>> {
    let MainInput {
        mut args,
        body,
        mut arg_errors,
        mut body_errors,
    } = input;
    if let Some(w) = args
        .workers
        .as_ref()
        .filter(|w| w.value == Workers::Count(0))
    {
        arg_errors.push(Error::new(
            w.span,
            "`workers` must be at least 1; write `workers = \"auto\"` for one per CPU",
        ));
        args.workers = None;
    }
    signature(&body.func.sig, &mut body_errors);
    branches(&body.parts, &body.func.sig.ident, &mut body_errors);
    let expandable = body_errors.is_empty() && args.types_known;
    let main = Main { args, body };
    let Some(error) = arg_errors.then(body_errors).into_error() else {
        return Ok(main);
    };
    let recovery = if expandable {
        MainRecovery::Defaults(Box::new(main))
    } else {
        MainRecovery::Stub(Box::new(main.body))
    };
    Err(Invalid { error, recovery })
}

fn signature(sig: &Signature, errors: &mut Errors) {
    if sig.asyncness.is_none() {
        errors.push(Error::new(
            sig.fn_token.span,
            format!(
                "`#[cluster::main]` requires an `async fn`; write `async fn {}()`",
                sig.ident
            ),
        ));
    }
    // `new_spanned` underlines every token of the node; `Spanned::span` gives only the first
    // on stable.
    if !sig.generics.params.is_empty() {
        errors.push(Error::new_spanned(
            &sig.generics,
            "the `#[cluster::main]` function cannot be generic; remove the generic parameters",
        ));
    }
    if let Some(clause) = &sig.generics.where_clause {
        errors.push(Error::new_spanned(
            clause,
            "the `#[cluster::main]` function cannot have a `where` clause; remove it",
        ));
    }
    if !sig.inputs.is_empty() {
        errors.push(Error::new_spanned(
            &sig.inputs,
            "the `#[cluster::main]` function takes no parameters; remove them, and read \
             command-line arguments with `std::env::args()`",
        ));
    }
}

/// One block per role, each with its handlers right.
fn branches(parts: &[Part], name: &Ident, errors: &mut Errors) {
    let mut seen: Vec<Role> = Vec::new();
    // A block marked with both roles already has its error; it would also make one of them
    // look missing.
    let mut both_roles = false;
    for part in parts {
        let Part::Branch(b) = part else {
            continue;
        };
        handlers(b, errors);
        if let Some((again, span)) = b.also {
            errors.push(Error::new(
                span,
                format!(
                    "a block cannot be both `#[{}]` and `#[{}]`; give each role its own block",
                    b.role.name(),
                    again.name()
                ),
            ));
            both_roles = true;
        } else if seen.contains(&b.role) {
            errors.push(Error::new(
                b.role_span,
                format!(
                    "duplicate `#[{0}]` block; `main` takes one, so merge this block into the \
                     first `#[{0}]` block",
                    b.role.name()
                ),
            ));
        } else {
            seen.push(b.role);
        }
    }
    if both_roles {
        return;
    }
    if !seen.contains(&Role::Primary) {
        errors.push(Error::new(
            name.span(),
            "missing `#[primary] { .. }` block; add the code only the primary runs, as in \
             `#[primary(cluster)] { .. }`",
        ));
    }
    if !seen.contains(&Role::Worker) {
        errors.push(Error::new(
            name.span(),
            "missing `#[worker] { .. }` block; add the code every worker runs, as in \
             `#[worker(worker)] { .. }`",
        ));
    }
}

fn handlers(b: &Branch, errors: &mut Errors) {
    let mut seen: Vec<&Handler> = Vec::new();
    for h in &b.handlers {
        let name = h.event.name();
        if b.role == Role::Worker {
            errors.push(Error::new(
                h.on_span,
                format!(
                    "`#[on({name})]` handlers go in the `#[primary]` block, which receives the \
                     events; move `{}` there",
                    h.sig.ident
                ),
            ));
            continue;
        }
        if h.sig.asyncness.is_none() {
            errors.push(Error::new(
                h.sig.fn_token.span,
                format!(
                    "an `#[on({name})]` handler must be an `async fn`; write `async fn {}`",
                    h.sig.ident
                ),
            ));
            continue;
        }
        if let Some(first) = seen.iter().find(|f| f.event == h.event) {
            errors.push(Error::new(
                h.event_span,
                format!(
                    "duplicate handler for the `{name}` event, already handled by `{}`; merge \
                     the two into one `#[on({name})]` handler",
                    first.sig.ident
                ),
            ));
            continue;
        }
        seen.push(h);
    }
}

/// A valid `#[cluster::message]` type.
pub struct Message {
    pub krate: Option<Path>,
    pub item: Item,
    pub ident: Ident,
}

/// What an invalid message type still expands to.
pub enum MessageRecovery {
    /// Only the arguments are wrong: the whole expansion, with the default for them.
    Defaults(Box<Message>),
    /// The type cannot be a message: its derives without the `Message` impl, so its
    /// `#[serde(..)]` attributes and uses raise no errors of their own.
    Derives(Box<Message>),
    /// The `crate` path is unknown, so nothing the expansion names would resolve: the item.
    Verbatim(Box<Item>),
}

pub fn message(input: MessageInput) -> Result<Message, Invalid<MessageRecovery>> {
    let MessageInput {
        args,
        item,
        ident,
        generics,
        arg_errors,
    } = input;
    let mut type_errors = Errors::default();
    if !generics.params.is_empty() {
        type_errors.push(Error::new_spanned(
            &generics,
            "a cluster message cannot be generic; define one concrete type per message",
        ));
    } else if let Some(clause) = &generics.where_clause {
        type_errors.push(Error::new_spanned(
            clause,
            "a cluster message cannot have a `where` clause; remove it",
        ));
    }
    let type_ok = type_errors.is_empty();
    let message = Message {
        krate: args.krate,
        item,
        ident,
    };
    let Some(error) = arg_errors.then(type_errors).into_error() else {
        return Ok(message);
    };
    let recovery = if !args.crate_known {
        MessageRecovery::Verbatim(Box::new(message.item))
    } else if type_ok {
        MessageRecovery::Defaults(Box::new(message))
    } else {
        MessageRecovery::Derives(Box::new(message))
    };
    Err(Invalid { error, recovery })
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;

    use super::*;

    fn validate(args: TokenStream, item: TokenStream) -> Result<Main, Invalid<MainRecovery>> {
        let Ok(input) = MainInput::parse(args, item) else {
            panic!("not a function");
        };
        main(input)
    }

    fn errors(invalid: &Invalid<MainRecovery>) -> Vec<String> {
        invalid
            .error
            .clone()
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn valid() {
        let main = validate(
            quote!(workers = 2),
            quote!(
                async fn main() {
                    #[primary(c)]
                    {}
                    #[worker]
                    {}
                }
            ),
        );
        assert!(main.is_ok());
    }

    #[test]
    fn wrong_arguments_only_expand_with_defaults() {
        let Err(invalid) = validate(
            quote!(workers = 0, scheduling = "random"),
            quote!(
                async fn main() {
                    #[primary(c)]
                    {}
                    #[worker]
                    {}
                }
            ),
        ) else {
            panic!("valid");
        };
        assert_eq!(errors(&invalid).len(), 2);
        let MainRecovery::Defaults(main) = invalid.recovery else {
            panic!("not expanded with defaults");
        };
        assert!(main.args.workers.is_none() && main.args.scheduling.is_none());
    }

    #[test]
    fn wrong_body_or_unknown_types_give_a_stub() {
        for (args, item) in [
            (
                quote!(),
                quote!(
                    fn main() {
                        #[primary]
                        {}
                        #[worker]
                        {}
                    }
                ),
            ),
            (
                quote!(),
                quote!(
                    async fn main() {
                        #[primary]
                        {}
                    }
                ),
            ),
            (
                quote!(),
                quote!(
                    async fn main() {
                        #[primary]
                        {
                            #[on(nonsense)]
                            async fn f() {}
                        }
                        #[worker]
                        {}
                    }
                ),
            ),
            (
                quote!(messages(to_workers = W)),
                quote!(
                    async fn main() {
                        #[primary]
                        {}
                        #[worker]
                        {}
                    }
                ),
            ),
        ] {
            let Err(invalid) = validate(args.clone(), item.clone()) else {
                panic!("valid: {args} {item}");
            };
            assert!(
                matches!(invalid.recovery, MainRecovery::Stub(_)),
                "{args} {item}"
            );
        }
    }

    #[test]
    fn independent_errors_together_arguments_first() {
        let Err(invalid) = validate(
            quote!(workers = 0, threads = 4),
            quote!(
                fn main<T>(port: u16) {
                    #[primary]
                    {
                        #[on(online)]
                        fn a() {}
                        #[on(online)]
                        async fn b() {}
                    }
                    #[primary]
                    {}
                }
            ),
        ) else {
            panic!("valid");
        };
        let errors = errors(&invalid);
        let expected = [
            "unknown argument `threads`",
            "`workers` must be at least 1",
            "requires an `async fn`",
            "cannot be generic",
            "takes no parameters",
            "an `#[on(online)]` handler must be an `async fn`",
            "duplicate `#[primary]` block",
            "missing `#[worker] { .. }` block",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (e, x) in errors.iter().zip(expected) {
            assert!(e.contains(x), "{e:?} lacks {x:?}");
        }
    }
}
