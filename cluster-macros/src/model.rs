//! The model of an annotated `main`: its two branches, the shared code around them, and the
//! `#[on(..)]` handlers of the primary branch. Building it validates the function.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Attribute, Block, Error, Ident, ItemFn, Stmt};

/// Which branch a block is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Worker,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Worker => "worker",
        }
    }
}

/// One `#[primary(name)] { .. }` or `#[worker(name)] { .. }` block.
pub struct Branch {
    pub binding: Option<Ident>,
    pub block: Block,
    pub handlers: Vec<Handler>,
}

/// The event kinds a handler may take, with the event's fields in call order.
pub const EVENTS: &[(&str, &str, &[&str])] = &[
    ("fork", "Fork", &["worker"]),
    ("online", "Online", &["worker"]),
    ("listening", "Listening", &["worker", "address"]),
    ("disconnect", "Disconnect", &["worker"]),
    ("exit", "Exit", &["worker", "status"]),
    ("message", "Message", &["worker", "msg"]),
    ("error", "Error", &["worker", "error"]),
    ("setup", "Setup", &["settings"]),
];

/// An `#[on(event)] async fn` in the primary branch.
pub struct Handler {
    pub event: usize,
    /// The event's name in `#[on(..)]`: the event's fields are passed with its span, so a
    /// handler whose parameters do not fit shows which event they should fit.
    pub event_span: Span,
    pub ident: Ident,
}

/// A statement of `main`'s body: shared code or a branch.
pub enum Part {
    Shared(Box<Stmt>),
    Branch(Role),
}

pub struct Model {
    pub func: ItemFn,
    pub parts: Vec<Part>,
    pub primary: Branch,
    pub worker: Branch,
}

fn push(errors: &mut Option<Error>, e: Error) {
    match errors {
        Some(all) => all.combine(e),
        None => *errors = Some(e),
    }
}

/// Recognises `#[primary]`, `#[primary(name)]`, `#[worker]` and `#[worker(name)]`.
fn branch_attr(attrs: &[Attribute]) -> Option<(usize, Role)> {
    attrs.iter().enumerate().find_map(|(i, a)| {
        if a.path().is_ident("primary") {
            Some((i, Role::Primary))
        } else if a.path().is_ident("worker") {
            Some((i, Role::Worker))
        } else {
            None
        }
    })
}

fn binding(attr: &Attribute, role: Role) -> syn::Result<Option<Ident>> {
    match &attr.meta {
        syn::Meta::Path(_) => Ok(None),
        syn::Meta::List(l) => l.parse_args::<Ident>().map(Some).map_err(|_| {
            let msg = format!(
                "expected one name for the {0} handle, as in `#[{0}(handle)]`",
                role.name()
            );
            if l.tokens.is_empty() {
                Error::new(l.delimiter.span().join(), msg)
            } else {
                Error::new_spanned(&l.tokens, msg)
            }
        }),
        syn::Meta::NameValue(nv) => Err(Error::new_spanned(
            nv,
            format!("expected `#[{0}]` or `#[{0}(handle)]`", role.name()),
        )),
    }
}

pub fn build(mut func: ItemFn) -> Result<Model, Error> {
    let mut errors = None;
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        push(
            &mut errors,
            Error::new(
                sig.fn_token.span,
                format!(
                    "`#[cluster::main]` requires an `async fn`; write `async fn {}()`",
                    sig.ident
                ),
            ),
        );
    }
    // `new_spanned` underlines every token of the node; `Spanned::span` gives only the first
    // on stable.
    if !sig.generics.params.is_empty() {
        push(
            &mut errors,
            Error::new_spanned(
                &sig.generics,
                "the `#[cluster::main]` function cannot be generic; remove the generic parameters",
            ),
        );
    }
    if let Some(clause) = &sig.generics.where_clause {
        push(
            &mut errors,
            Error::new_spanned(
                clause,
                "the `#[cluster::main]` function cannot have a `where` clause; remove it",
            ),
        );
    }
    if !sig.inputs.is_empty() {
        push(
            &mut errors,
            Error::new_spanned(
                &sig.inputs,
                "the `#[cluster::main]` function takes no parameters; remove them, and read \
                 command-line arguments with `std::env::args()`",
            ),
        );
    }
    let mut parts = Vec::new();
    let mut primary: Option<Branch> = None;
    let mut worker: Option<Branch> = None;
    // A block marked with both roles already has its error; it would also make one of them
    // look missing.
    let mut both_roles = false;
    let stmts = std::mem::take(&mut func.block.stmts);
    for stmt in stmts {
        let Stmt::Expr(syn::Expr::Block(mut eb), semi) = stmt else {
            parts.push(Part::Shared(Box::new(stmt)));
            continue;
        };
        let Some((i, role)) = branch_attr(&eb.attrs) else {
            parts.push(Part::Shared(Box::new(Stmt::Expr(
                syn::Expr::Block(eb),
                semi,
            ))));
            continue;
        };
        let attr = eb.attrs.remove(i);
        if let Some((j, again)) = branch_attr(&eb.attrs) {
            push(
                &mut errors,
                Error::new(
                    eb.attrs[j].path().span(),
                    format!(
                        "a block cannot be both `#[{}]` and `#[{}]`; give each role its own block",
                        role.name(),
                        again.name()
                    ),
                ),
            );
            both_roles = true;
            continue;
        }
        let bind = match binding(&attr, role) {
            Ok(b) => b,
            Err(e) => {
                push(&mut errors, e);
                None
            }
        };
        let slot = match role {
            Role::Primary => &mut primary,
            Role::Worker => &mut worker,
        };
        if slot.is_some() {
            push(
                &mut errors,
                Error::new(
                    attr.path().span(),
                    format!(
                        "duplicate `#[{0}]` block; `main` takes one, so merge this block into \
                         the first `#[{0}]` block",
                        role.name()
                    ),
                ),
            );
            continue;
        }
        let mut block = eb.block;
        let handlers = if role == Role::Primary {
            take_handlers(&mut block, &mut errors)
        } else {
            Vec::new()
        };
        *slot = Some(Branch {
            binding: bind,
            block,
            handlers,
        });
        parts.push(Part::Branch(role));
    }
    let name = &func.sig.ident;
    if primary.is_none() && !both_roles {
        push(
            &mut errors,
            Error::new(
                name.span(),
                "missing `#[primary] { .. }` block; add the code only the primary runs, as in \
                 `#[primary(cluster)] { .. }`",
            ),
        );
    }
    if worker.is_none() && !both_roles {
        push(
            &mut errors,
            Error::new(
                name.span(),
                "missing `#[worker] { .. }` block; add the code every worker runs, as in \
                 `#[worker(worker)] { .. }`",
            ),
        );
    }
    match (errors, primary, worker) {
        (None, Some(primary), Some(worker)) => Ok(Model {
            func,
            parts,
            primary,
            worker,
        }),
        (e, _, _) => Err(e.unwrap_or_else(|| Error::new(Span::call_site(), "invalid `main`"))),
    }
}

/// Takes `#[on(event)]` off handler functions, records them, and checks them.
fn take_handlers(block: &mut Block, errors: &mut Option<Error>) -> Vec<Handler> {
    let mut handlers: Vec<Handler> = Vec::new();
    for stmt in &mut block.stmts {
        let Stmt::Item(syn::Item::Fn(f)) = stmt else {
            continue;
        };
        let Some(i) = f.attrs.iter().position(|a| a.path().is_ident("on")) else {
            continue;
        };
        let attr = f.attrs.remove(i);
        let names = EVENTS
            .iter()
            .map(|(n, _, _)| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let (event, event_span) = match attr.parse_args::<Ident>() {
            Ok(ev) => match EVENTS.iter().position(|(n, _, _)| ev == n) {
                Some(k) => (k, ev.span()),
                None => {
                    push(
                        errors,
                        Error::new(
                            ev.span(),
                            format!("unknown event `{ev}`; expected one of {names}"),
                        ),
                    );
                    continue;
                }
            },
            Err(_) => {
                push(
                    errors,
                    Error::new_spanned(
                        &attr.meta,
                        format!("expected `#[on(event)]` with one event: one of {names}"),
                    ),
                );
                continue;
            }
        };
        let name = EVENTS[event].0;
        if f.sig.asyncness.is_none() {
            push(
                errors,
                Error::new(
                    f.sig.fn_token.span,
                    format!(
                        "an `#[on({name})]` handler must be an `async fn`; write `async fn {}`",
                        f.sig.ident
                    ),
                ),
            );
            continue;
        }
        if let Some(first) = handlers.iter().find(|h| h.event == event) {
            push(
                errors,
                Error::new(
                    event_span,
                    format!(
                        "duplicate handler for the `{name}` event, already handled by `{}`; \
                         merge the two into one `#[on({name})]` handler",
                        first.ident
                    ),
                ),
            );
            continue;
        }
        // Handlers must be `async` to be awaited by the loop, even those that await nothing.
        f.attrs
            .push(syn::parse_quote!(#[allow(clippy::unused_async)]));
        handlers.push(Handler {
            event,
            event_span,
            ident: f.sig.ident.clone(),
        });
    }
    handlers
}
