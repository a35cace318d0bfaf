//! Parsing the arguments of `#[cluster::main(..)]` and `#[cluster::message(..)]`.
//!
//! Every key goes through one place, [`Keys::check`], which reports unknown and duplicate keys
//! with the list of accepted ones; values keep their spans for the errors of `validate`.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::{Error, LitInt, LitStr, Path, Type};

/// The value of `workers`.
pub enum WorkersArg {
    Auto,
    Count(usize),
}

/// The parsed arguments of `#[cluster::main]`.
#[derive(Default)]
pub struct MainArgs {
    pub workers: Option<(WorkersArg, Span)>,
    pub scheduling: Option<(String, Span)>,
    pub to_primary: Option<Type>,
    pub to_worker: Option<Type>,
    pub krate: Option<Path>,
}

/// Tracks seen keys, so duplicates and unknown keys are found in one generic place.
struct Keys {
    accepted: &'static [&'static str],
    seen: Vec<String>,
}

impl Keys {
    fn new(accepted: &'static [&'static str]) -> Self {
        Keys {
            accepted,
            seen: Vec::new(),
        }
    }

    /// The key of `meta`, if accepted and new; otherwise the error to report.
    fn check(&mut self, meta: &ParseNestedMeta<'_>, what: &str) -> syn::Result<String> {
        let key = meta
            .path
            .get_ident()
            .map(|i| i.to_string())
            .unwrap_or_else(|| {
                let p = &meta.path;
                quote::quote!(#p).to_string().replace(' ', "")
            });
        if !self.accepted.contains(&key.as_str()) {
            let list = self
                .accepted
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let expected = if self.accepted.len() == 1 {
                format!("the only {what} is {list}")
            } else {
                format!("expected one of {list}")
            };
            return Err(meta.error(format!("unknown {what} `{key}`; {expected}")));
        }
        if self.seen.contains(&key) {
            return Err(meta.error(format!("duplicate {what} `{key}`; remove one of them")));
        }
        self.seen.push(key.clone());
        Ok(key)
    }
}

/// Consumes the value of a rejected key, so parsing can go on and report later errors too.
fn skip_value(meta: &ParseNestedMeta<'_>) {
    if meta.input.peek(syn::Token![=]) {
        let _ = meta.value().and_then(|v| v.parse::<syn::Expr>());
    } else if meta.input.peek(syn::token::Paren) {
        let _ = meta.parse_nested_meta(|m| {
            skip_value(&m);
            Ok(())
        });
    }
}

fn push(errors: &mut Option<Error>, e: Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

pub fn parse_main(tokens: TokenStream) -> Result<MainArgs, Error> {
    let mut args = MainArgs::default();
    let mut keys = Keys::new(&["workers", "scheduling", "messages", "crate"]);
    let mut errors = None;
    let parser = syn::meta::parser(|meta| {
        let key = match keys.check(&meta, "argument") {
            Ok(k) => k,
            Err(e) => {
                push(&mut errors, e);
                skip_value(&meta);
                return Ok(());
            }
        };
        let res = match key.as_str() {
            "workers" => parse_workers(&meta).map(|w| args.workers = Some(w)),
            "scheduling" => parse_scheduling(&meta).map(|s| args.scheduling = Some(s)),
            "messages" => parse_messages(&meta, &mut args, &mut errors),
            "crate" => parse_crate(&meta).map(|p| args.krate = Some(p)),
            _ => unreachable!("Keys::check admits only accepted keys"),
        };
        if let Err(e) = res {
            push(&mut errors, e);
        }
        Ok(())
    });
    syn::parse::Parser::parse2(parser, tokens)?;
    match errors {
        Some(e) => Err(e),
        None => Ok(args),
    }
}

fn parse_workers(meta: &ParseNestedMeta<'_>) -> syn::Result<(WorkersArg, Span)> {
    let expected = "expected `workers = \"auto\"` or an integer of at least 1, as in `workers = 4`";
    let value = meta.value()?;
    if value.peek(LitStr) {
        let s: LitStr = value.parse()?;
        let text = s.value();
        if text == "auto" {
            return Ok((WorkersArg::Auto, s.span()));
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
            Ok(0) => Err(Error::new(
                n.span(),
                "`workers` must be at least 1; write `workers = \"auto\"` for one per CPU",
            )),
            Ok(v) => Ok((WorkersArg::Count(v), n.span())),
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

const POLICIES: &str = "`\"round-robin\"`, `\"shared\"`, `\"reuseport\"`";

fn parse_scheduling(meta: &ParseNestedMeta<'_>) -> syn::Result<(String, Span)> {
    let value = meta.value()?;
    let e: syn::Expr = value.parse()?;
    match &e {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => match s.value().as_str() {
            v @ ("round-robin" | "shared" | "reuseport") => Ok((v.to_owned(), s.span())),
            other => Err(Error::new(
                s.span(),
                format!("unknown scheduling policy `{other:?}`; expected one of {POLICIES}"),
            )),
        },
        _ => Err(Error::new_spanned(
            e,
            format!("`scheduling` takes a string; expected one of {POLICIES}"),
        )),
    }
}

fn parse_messages(
    meta: &ParseNestedMeta<'_>,
    args: &mut MainArgs,
    errors: &mut Option<Error>,
) -> syn::Result<()> {
    if !meta.input.peek(syn::token::Paren) {
        skip_value(meta);
        return Err(
            meta.error("`messages` takes a list, as in `messages(to_primary = T, to_worker = U)`")
        );
    }
    let mut keys = Keys::new(&["to_primary", "to_worker"]);
    meta.parse_nested_meta(|inner| {
        let key = match keys.check(&inner, "message direction") {
            Ok(k) => k,
            Err(e) => {
                push(errors, e);
                skip_value(&inner);
                return Ok(());
            }
        };
        let ty: Type = inner.value()?.parse()?;
        if key == "to_primary" {
            args.to_primary = Some(ty);
        } else {
            args.to_worker = Some(ty);
        }
        Ok(())
    })
}

fn parse_crate(meta: &ParseNestedMeta<'_>) -> syn::Result<Path> {
    let value = meta.value()?;
    if !value.peek(LitStr) {
        let e: syn::Expr = value.parse()?;
        return Err(Error::new_spanned(
            &e,
            format!(
                "`crate` takes a string; write `crate = \"{}\"`",
                quote::quote!(#e).to_string().replace(' ', "")
            ),
        ));
    }
    let s: LitStr = value.parse()?;
    s.parse::<Path>().map_err(|_| {
        Error::new(
            s.span(),
            format!(
                "`crate` takes the path of the renamed `cluster` dependency, such as \
                 `\"my_cluster\"`; `{:?}` is not a path",
                s.value()
            ),
        )
    })
}

/// The arguments of `#[cluster::message]`: only `crate`.
pub fn parse_message(tokens: TokenStream) -> Result<Option<Path>, Error> {
    let mut krate = None;
    let mut keys = Keys::new(&["crate"]);
    let parser = syn::meta::parser(|meta| {
        keys.check(&meta, "argument")?;
        krate = Some(parse_crate(&meta)?);
        Ok(())
    });
    syn::parse::Parser::parse2(parser, tokens)?;
    Ok(krate)
}
