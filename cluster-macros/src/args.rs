//! Parsing the arguments of `#[cluster::main(..)]` and `#[cluster::message(..)]` into typed
//! values.
//!
//! Every key goes through one place, [`Keys::check`], which reports unknown and duplicate keys
//! with the list of accepted ones. A rejected key or value is skipped up to the next `,`, so one
//! mistake is one error and the arguments after it are still parsed. Values keep their spans;
//! checks of their range (`workers = 0`) are `validate`'s.

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::meta::ParseNestedMeta;
use syn::parse::{ParseStream, Parser};
use syn::{Error, LitInt, LitStr, Path, Token, Type};

use crate::errors::Errors;

/// A value and the span of the tokens it was written as.
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

/// The value of `workers`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    /// Not yet checked to be at least 1.
    Count(usize),
}

/// The value of `scheduling`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    RoundRobin,
    Shared,
    ReusePort,
}

impl Scheduling {
    const ALL: [Scheduling; 3] = [
        Scheduling::RoundRobin,
        Scheduling::Shared,
        Scheduling::ReusePort,
    ];

    /// As written in `scheduling = ".."` and in `CLUSTER_SCHED_POLICY`.
    fn name(self) -> &'static str {
        match self {
            Scheduling::RoundRobin => "round-robin",
            Scheduling::Shared => "shared",
            Scheduling::ReusePort => "reuseport",
        }
    }

    fn expected() -> String {
        Self::ALL
            .iter()
            .map(|s| format!("`\"{}\"`", s.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The parsed arguments of `#[cluster::main]`.
pub struct MainArgs {
    pub workers: Option<Spanned<Workers>>,
    pub scheduling: Option<Spanned<Scheduling>>,
    pub to_primary: Option<Type>,
    pub to_worker: Option<Type>,
    pub krate: Option<Path>,
    /// Whether every argument that shapes the types the body sees (`messages`, `crate`) was
    /// understood. When one was not, the body is not expanded: with a default in its place, the
    /// body's uses of the user's types would be errors that only follow from the first.
    pub types_known: bool,
}

/// The parsed arguments of `#[cluster::message]`.
pub struct MessageArgs {
    pub krate: Option<Path>,
    /// Whether `crate`, if given, was understood: without it, nothing the expansion names
    /// would resolve.
    pub crate_known: bool,
}

/// Tracks seen keys, so duplicates and unknown keys are found in one generic place.
struct Keys<K: 'static> {
    /// What a key is called in messages: "argument", "message direction".
    what: &'static str,
    accepted: &'static [(&'static str, K)],
    seen: Vec<&'static str>,
}

/// Why [`Keys::check`] rejected a key.
enum Rejected {
    Unknown(Error),
    Duplicate(Error),
}

impl Rejected {
    fn into_error(self) -> Error {
        match self {
            Rejected::Unknown(e) | Rejected::Duplicate(e) => e,
        }
    }
}

impl<K: Copy> Keys<K> {
    fn new(what: &'static str, accepted: &'static [(&'static str, K)]) -> Self {
        Keys {
            what,
            accepted,
            seen: Vec::new(),
        }
    }

    /// The key of `meta`, if accepted and new.
    fn check(&mut self, meta: &ParseNestedMeta<'_>) -> Result<K, Rejected> {
        let what = self.what;
        let Some(&(name, key)) = self
            .accepted
            .iter()
            .find(|(name, _)| meta.path.is_ident(name))
        else {
            let list = self
                .accepted
                .iter()
                .map(|(a, _)| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let expected = if self.accepted.len() == 1 {
                format!("the only {what} is {list}")
            } else {
                format!("expected one of {list}")
            };
            let path = &meta.path;
            let written = quote::quote!(#path).to_string().replace(' ', "");
            return Err(Rejected::Unknown(
                meta.error(format!("unknown {what} `{written}`; {expected}")),
            ));
        };
        if self.seen.contains(&name) {
            return Err(Rejected::Duplicate(
                meta.error(format!("duplicate {what} `{name}`; remove one of them")),
            ));
        }
        self.seen.push(name);
        Ok(key)
    }
}

/// Skips the rest of a rejected argument, up to the next `,` between arguments (a `,` inside a
/// group is one token tree with it).
fn skip_rest(input: ParseStream<'_>) -> syn::Result<()> {
    while !input.is_empty() && !input.peek(Token![,]) {
        input.parse::<TokenTree>()?;
    }
    Ok(())
}

/// The value after `key =`, or an error that shows the form with `example` for the value.
fn value<'a>(meta: &ParseNestedMeta<'a>, example: &str) -> syn::Result<ParseStream<'a>> {
    meta.value().map_err(|e| {
        let path = &meta.path;
        let key = quote::quote!(#path).to_string();
        Error::new(
            e.span(),
            format!("expected `=` and a value after `{key}`, as in `{key} = {example}`"),
        )
    })
}

/// Whether the value that follows has the shape of a `messages(..)` list or a `crate = ".."`
/// string: an unknown key written so may be a misspelt one of those.
fn looks_like_types(input: ParseStream<'_>) -> bool {
    input.peek(syn::token::Paren) || (input.peek(Token![=]) && input.peek2(LitStr))
}

#[derive(Clone, Copy)]
enum MainKey {
    Workers,
    Scheduling,
    Messages,
    Crate,
}

const MAIN_KEYS: &[(&str, MainKey)] = &[
    ("workers", MainKey::Workers),
    ("scheduling", MainKey::Scheduling),
    ("messages", MainKey::Messages),
    ("crate", MainKey::Crate),
];

pub fn parse_main(tokens: TokenStream, errors: &mut Errors) -> MainArgs {
    let mut args = MainArgs {
        workers: None,
        scheduling: None,
        to_primary: None,
        to_worker: None,
        krate: None,
        types_known: true,
    };
    let mut keys = Keys::new("argument", MAIN_KEYS);
    let parser = syn::meta::parser(|meta| {
        let parsed = match keys.check(&meta) {
            Ok(key) => args.parse(key, &meta, errors),
            Err(rejected) => {
                let shapes_types = match &rejected {
                    Rejected::Unknown(_) => looks_like_types(meta.input),
                    // The second of two `messages` or `crate` may be the one the body was
                    // written against.
                    Rejected::Duplicate(_) => {
                        meta.path.is_ident("messages") || meta.path.is_ident("crate")
                    }
                };
                args.types_known &= !shapes_types;
                Err(rejected.into_error())
            }
        };
        if let Err(e) = parsed {
            errors.push(e);
            skip_rest(meta.input)?;
        }
        Ok(())
    });
    // Only a token that cannot start an argument (`#[cluster::main(4)]`) gets here; what came
    // after it is unknown.
    if let Err(e) = parser.parse2(tokens) {
        errors.push(e);
        args.types_known = false;
    }
    args
}

impl MainArgs {
    fn parse(
        &mut self,
        key: MainKey,
        meta: &ParseNestedMeta<'_>,
        errors: &mut Errors,
    ) -> syn::Result<()> {
        match key {
            MainKey::Workers => self.workers = Some(parse_workers(meta)?),
            MainKey::Scheduling => self.scheduling = Some(parse_scheduling(meta)?),
            MainKey::Messages => {
                if !self.parse_messages(meta, errors) {
                    self.types_known = false;
                }
            }
            MainKey::Crate => match parse_crate(meta) {
                Ok(path) => self.krate = Some(path),
                Err((e, recovered)) => {
                    self.types_known &= recovered.is_some();
                    self.krate = recovered;
                    return Err(e);
                }
            },
        }
        Ok(())
    }

    /// Parses `messages(to_primary = T, to_worker = U)`, pushing each mistake; whether there
    /// was none.
    fn parse_messages(&mut self, meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> bool {
        #[derive(Clone, Copy)]
        enum Direction {
            ToPrimary,
            ToWorker,
        }
        const DIRECTIONS: &[(&str, Direction)] = &[
            ("to_primary", Direction::ToPrimary),
            ("to_worker", Direction::ToWorker),
        ];
        if !meta.input.peek(syn::token::Paren) {
            let _ = skip_rest(meta.input);
            errors.push(
                meta.error(
                    "`messages` takes a list, as in `messages(to_primary = T, to_worker = U)`",
                ),
            );
            return false;
        }
        let mut clean = true;
        let mut keys = Keys::new("message direction", DIRECTIONS);
        let parsed = meta.parse_nested_meta(|inner| {
            let ty = keys
                .check(&inner)
                .map_err(Rejected::into_error)
                .and_then(|direction| Ok((direction, value(&inner, "T")?.parse::<Type>()?)));
            match ty {
                Ok((Direction::ToPrimary, ty)) => self.to_primary = Some(ty),
                Ok((Direction::ToWorker, ty)) => self.to_worker = Some(ty),
                Err(e) => {
                    errors.push(e);
                    clean = false;
                    skip_rest(inner.input)?;
                }
            }
            Ok(())
        });
        if let Err(e) = parsed {
            errors.push(e);
            clean = false;
        }
        clean
    }
}

fn parse_workers(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<Workers>> {
    let expected = "expected `workers = \"auto\"` or an integer of at least 1, as in `workers = 4`";
    let value = value(meta, "4")?;
    if value.peek(LitStr) {
        let s: LitStr = value.parse()?;
        let text = s.value();
        if text == "auto" {
            return Ok(Spanned {
                value: Workers::Auto,
                span: s.span(),
            });
        }
        let msg = match text.trim().parse::<usize>() {
            Ok(0) => "`workers` must be at least 1; write `workers = \"auto\"` for one per CPU"
                .to_owned(),
            Ok(n) => format!("`workers` takes an integer, not a string; write `workers = {n}`"),
            Err(_) => format!("invalid `workers` value `{text:?}`; {expected}"),
        };
        return Err(Error::new(s.span(), msg));
    }
    if value.peek(LitInt) {
        let n: LitInt = value.parse()?;
        return match n.base10_parse::<usize>() {
            Ok(count) => Ok(Spanned {
                value: Workers::Count(count),
                span: n.span(),
            }),
            Err(_) => Err(Error::new(
                n.span(),
                format!("invalid `workers` value `{n}`; {expected}"),
            )),
        };
    }
    let e: syn::Expr = value.parse()?;
    Err(Error::new_spanned(
        e,
        "`workers` takes a literal: `\"auto\"` or an integer of at least 1, as in \
         `workers = 4`; to choose at run time, set the `CLUSTER_WORKERS` environment variable",
    ))
}

fn parse_scheduling(meta: &ParseNestedMeta<'_>) -> syn::Result<Spanned<Scheduling>> {
    let e: syn::Expr = value(meta, "\"shared\"")?.parse()?;
    let syn::Expr::Lit(syn::ExprLit {
        lit: syn::Lit::Str(s),
        ..
    }) = &e
    else {
        return Err(Error::new_spanned(
            e,
            format!(
                "`scheduling` takes a string; expected one of {}",
                Scheduling::expected()
            ),
        ));
    };
    let text = s.value();
    match Scheduling::ALL.into_iter().find(|p| p.name() == text) {
        Some(policy) => Ok(Spanned {
            value: policy,
            span: s.span(),
        }),
        None => Err(Error::new(
            s.span(),
            format!(
                "unknown scheduling policy `{text:?}`; expected one of {}",
                Scheduling::expected()
            ),
        )),
    }
}

/// The path of `crate = "path"`. On error, the path still, when the user wrote one but not as a
/// string: the expansion can use it, so the only error is the form of the argument.
fn parse_crate(meta: &ParseNestedMeta<'_>) -> Result<Path, (Error, Option<Path>)> {
    let value = value(meta, "\"my_cluster\"").map_err(|e| (e, None))?;
    if !value.peek(LitStr) {
        let e: syn::Expr = value.parse().map_err(|e| (e, None))?;
        let error = Error::new_spanned(
            &e,
            format!(
                "`crate` takes a string; write `crate = \"{}\"`",
                quote::quote!(#e).to_string().replace(' ', "")
            ),
        );
        let recovered = match e {
            syn::Expr::Path(p) if p.qself.is_none() && p.attrs.is_empty() => Some(p.path),
            _ => None,
        };
        return Err((error, recovered));
    }
    let s: LitStr = value.parse().map_err(|e| (e, None))?;
    s.parse::<Path>().map_err(|_| {
        let error = Error::new(
            s.span(),
            format!(
                "`crate` takes the path of the renamed `cluster` dependency, such as \
                 `\"my_cluster\"`; `{:?}` is not a path",
                s.value()
            ),
        );
        (error, None)
    })
}

#[derive(Clone, Copy)]
enum MessageKey {
    Crate,
}

pub fn parse_message(tokens: TokenStream, errors: &mut Errors) -> MessageArgs {
    let mut args = MessageArgs {
        krate: None,
        crate_known: true,
    };
    let mut keys = Keys::new("argument", &[("crate", MessageKey::Crate)]);
    let parser = syn::meta::parser(|meta| {
        let parsed = match keys.check(&meta) {
            Ok(MessageKey::Crate) => match parse_crate(&meta) {
                Ok(path) => {
                    args.krate = Some(path);
                    Ok(())
                }
                Err((e, recovered)) => {
                    args.crate_known &= recovered.is_some();
                    args.krate = recovered;
                    Err(e)
                }
            },
            Err(rejected) => {
                let shapes_crate = match &rejected {
                    Rejected::Unknown(_) => looks_like_types(meta.input),
                    Rejected::Duplicate(_) => true,
                };
                args.crate_known &= !shapes_crate;
                Err(rejected.into_error())
            }
        };
        if let Err(e) = parsed {
            errors.push(e);
            skip_rest(meta.input)?;
        }
        Ok(())
    });
    if let Err(e) = parser.parse2(tokens) {
        errors.push(e);
        args.crate_known = false;
    }
    args
}

#[cfg(test)]
mod tests {
    use quote::quote;

    use super::*;

    /// The parsed arguments and the messages of their errors.
    fn main_args(tokens: TokenStream) -> (MainArgs, Vec<String>) {
        let mut errors = Errors::default();
        let args = parse_main(tokens, &mut errors);
        let messages = errors
            .into_error()
            .map(|e| e.into_iter().map(|e| e.to_string()).collect())
            .unwrap_or_default();
        (args, messages)
    }

    #[test]
    fn typed_values() {
        let (args, errors) = main_args(quote!(
            workers = 3,
            scheduling = "reuseport",
            messages(to_primary = P, to_worker = W),
            crate = "my_cluster"
        ));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(args.workers.is_some_and(|w| w.value == Workers::Count(3)));
        assert!(
            args.scheduling
                .is_some_and(|s| s.value == Scheduling::ReusePort)
        );
        assert!(args.to_primary.is_some() && args.to_worker.is_some());
        assert!(args.krate.is_some_and(|p| p.is_ident("my_cluster")));
        assert!(args.types_known);
    }

    #[test]
    fn one_error_per_mistake_and_the_rest_still_parsed() {
        let (args, errors) = main_args(quote!(
            workers 4,
            threads = 4,
            scheduling = "random",
            messages(to_primary = P)
        ));
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].contains("expected `=` and a value after `workers`"));
        assert!(errors[1].contains("unknown argument `threads`"));
        assert!(errors[2].contains("unknown scheduling policy"));
        assert!(args.workers.is_none());
        assert!(args.scheduling.is_none());
        assert!(args.to_primary.is_some());
        assert!(args.types_known);
    }

    #[test]
    fn duplicates_keep_the_first() {
        let (args, errors) = main_args(quote!(workers = 1, workers = 2));
        assert_eq!(errors, ["duplicate argument `workers`; remove one of them"]);
        assert!(args.workers.is_some_and(|w| w.value == Workers::Count(1)));
        assert!(args.types_known);
    }

    #[test]
    fn types_unknown_when_messages_or_crate_may_be_lost() {
        for tokens in [
            quote!(messages = P),
            quote!(messages(to_workers = W)),
            quote!(messages(to_primary = 4)),
            quote!(messages(to_primary = P), messages(to_worker = W)),
            quote!(message(to_primary = P)),
            quote!(krate = "my_cluster"),
            quote!(crate = "not a path"),
            quote!(crate = 4),
            quote!(4),
        ] {
            let (args, errors) = main_args(tokens.clone());
            assert!(!errors.is_empty(), "{tokens}");
            assert!(!args.types_known, "{tokens}");
        }
    }

    #[test]
    fn types_known_when_only_values_are_wrong() {
        for tokens in [
            quote!(workers = "lots"),
            quote!(workers = WORKERS),
            quote!(scheduling = RoundRobin),
            quote!(threads = 4),
            // The path is what the user meant; only its form is wrong.
            quote!(crate = my_cluster),
        ] {
            let (args, errors) = main_args(tokens.clone());
            assert_eq!(errors.len(), 1, "{tokens}: {errors:?}");
            assert!(args.types_known, "{tokens}");
        }
    }

    #[test]
    fn message_arguments() {
        let parse = |tokens: TokenStream| {
            let mut errors = Errors::default();
            let args = parse_message(tokens, &mut errors);
            (args, errors.is_empty())
        };
        let (args, ok) = parse(quote!(crate = "my_cluster"));
        assert!(ok && args.crate_known && args.krate.is_some());
        let (args, ok) = parse(quote!(crate = my_cluster));
        assert!(!ok && args.crate_known && args.krate.is_some());
        let (args, ok) = parse(quote!(serde = "::serde"));
        assert!(!ok && !args.crate_known);
        let (args, ok) = parse(quote!(threads = 4));
        assert!(!ok && args.crate_known && args.krate.is_none());
    }
}
