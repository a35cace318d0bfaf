//! Expansion of `#[cluster::main]`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::{Expr, Ident, Item, ItemFn, Stmt};

use crate::args::{self, MainArgs, WorkersArg};
use crate::model::{self, Branch, EVENTS, Part, Role};
use crate::paths::Krate;

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(f) => f,
        Err(e) => {
            let err = e.to_compile_error();
            return quote!(#err #item);
        }
    };
    let stub = stub(&func);
    try_expand(args, func).unwrap_or_else(|e| {
        let err = e.to_compile_error();
        quote!(#err #stub)
    })
}

fn try_expand(args: TokenStream, func: ItemFn) -> syn::Result<TokenStream> {
    // Both halves are checked before either error is returned, so every mistake shows in one
    // build.
    let (args, model) = both(args::parse_main(args), model::build(func))?;
    Ok(generate(&args, model))
}

fn both<A, B>(a: syn::Result<A>, b: syn::Result<B>) -> syn::Result<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(mut e), Err(more)) => {
            e.combine(more);
            Err(e)
        }
    }
}

/// What is emitted after the errors: a `fn main` with the user's name and attributes, so the
/// user does not also see "`main` function not found", holding the items of the body (handlers,
/// `use` declarations, helper functions) without their `#[on(..)]`, so that what the body uses
/// is not also reported as unused.
fn stub(func: &ItemFn) -> TokenStream {
    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let mut items = Vec::new();
    for stmt in &func.block.stmts {
        match stmt {
            Stmt::Item(item) => items.push(item.clone()),
            Stmt::Expr(Expr::Block(b), _) => {
                items.extend(b.block.stmts.iter().filter_map(|s| match s {
                    Stmt::Item(item) => Some(item.clone()),
                    _ => None,
                }));
            }
            _ => {}
        }
    }
    for item in &mut items {
        if let Item::Fn(f) = item {
            f.attrs.retain(|a| !a.path().is_ident("on"));
        }
    }
    quote! {
        #(#attrs)*
        #[allow(dead_code)]
        #vis fn #ident() {
            #(#items)*
        }
    }
}

// Input:
//   #[cluster::main(workers = 4, messages(to_primary = P))]
//   async fn main() -> R { shared; #[primary(cluster)] { .. } #[worker(worker)] { .. } tail }
// Output:
//   fn main() -> R {
//       use ::cluster as __cluster;
//       async fn __cluster_main(mut ctx: Context<P, ()>) -> R {
//           shared;
//           if let Some(cluster) = ctx.take_primary() { .. handlers' dispatch loop .. }
//           if let Some(worker) = ctx.take_worker() { .. }
//           tail
//       }
//       run::<P, (), _, _>(Config { workers: Workers::Count(4), .. }, __cluster_main)
//   }
fn generate(args: &MainArgs, model: model::Model) -> TokenStream {
    let (import, krate) = Krate(args.krate.clone()).import();
    let ctx = Ident::new("__cluster_ctx", Span::mixed_site());
    let inner = Ident::new("__cluster_main", Span::mixed_site());
    let unit = quote!(());
    let p_ty = args
        .to_primary
        .as_ref()
        .map_or(unit.clone(), |t| quote!(#t));
    let w_ty = args.to_worker.as_ref().map_or(unit, |t| quote!(#t));

    let mut body = Vec::new();
    for part in &model.parts {
        match part {
            Part::Shared(stmt) => body.push(quote!(#stmt)),
            Part::Branch(Role::Primary) => {
                body.push(branch(&krate, &ctx, &model.primary, Role::Primary))
            }
            Part::Branch(Role::Worker) => {
                body.push(branch(&krate, &ctx, &model.worker, Role::Worker))
            }
        }
    }

    let config = config(&krate, args);
    let run = krate.run();
    let context = krate.context();
    let func = &model.func;
    let attrs = &func.attrs;
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let output = &func.sig.output;
    quote! {
        #(#attrs)*
        #vis fn #ident() #output {
            #import
            #[allow(unused_mut, clippy::needless_return)]
            async fn #inner(mut #ctx: #context<#p_ty, #w_ty>) #output {
                #(#body)*
            }
            #run::<#p_ty, #w_ty, _, _>(#config, #inner)
        }
    }
}

fn config(krate: &Krate, args: &MainArgs) -> TokenStream {
    let cfg = krate.config();
    let workers_path = krate.workers();
    let sched = krate.scheduling();
    let workers = match &args.workers {
        Some((WorkersArg::Count(n), _)) => quote!(#workers_path::Count(#n)),
        _ => quote!(#workers_path::Auto),
    };
    let scheduling = match args.scheduling.as_ref().map(|(s, _)| s.as_str()) {
        Some("shared") => quote!(#sched::Shared),
        Some("reuseport") => quote!(#sched::ReusePort),
        _ => quote!(#sched::RoundRobin),
    };
    quote! {
        #cfg { workers: #workers, scheduling: #scheduling, ..::core::default::Default::default() }
    }
}

fn branch(krate: &Krate, ctx: &Ident, b: &Branch, role: Role) -> TokenStream {
    let option = krate.option();
    let take = match role {
        Role::Primary => format_ident!("take_primary"),
        Role::Worker => format_ident!("take_worker"),
    };
    let needs_name = !b.handlers.is_empty();
    let binding = match &b.binding {
        Some(id) => quote!(#id),
        None if needs_name => {
            let id = Ident::new("__cluster_primary", Span::mixed_site());
            quote!(#id)
        }
        None => quote!(_),
    };
    let stmts = &b.block.stmts;
    if !needs_name {
        return quote! {
            if let #option::Some(#binding) = #ctx.#take() {
                #(#stmts)*
            }
        };
    }
    // The loop follows the user's statements in the same block, so the handlers stay in scope;
    // a trailing expression (of type `()`, as the block's value is discarded) needs a `;` then.
    let (last, init) = match stmts.split_last() {
        Some((Stmt::Expr(e, None), init)) => (quote!(#e;), init),
        _ => (quote!(), stmts.as_slice()),
    };
    let dispatch = dispatch(krate, &binding, b);
    quote! {
        if let #option::Some(#binding) = #ctx.#take() {
            #(#init)*
            #last
            #dispatch
        }
    }
}

/// The event loop that calls the `#[on(..)]` handlers. Each call carries the handler's span and
/// each argument the span of the event's name in `#[on(..)]`, so a handler whose parameters do
/// not fit its event is an error on the handler that points at the event.
fn dispatch(krate: &Krate, primary: &TokenStream, b: &Branch) -> TokenStream {
    let event = krate.event();
    let output = krate.handler_output();
    let ev = Ident::new("__cluster_event", Span::mixed_site());
    let arms = b.handlers.iter().map(|h| {
        let (_, variant, fields) = EVENTS[h.event];
        let variant = Ident::new(variant, Span::call_site());
        let names: Vec<Ident> = fields
            .iter()
            .map(|f| Ident::new(f, Span::call_site()))
            .collect();
        let at_event = Span::mixed_site().located_at(h.event_span);
        let locals: Vec<Ident> = fields
            .iter()
            .map(|f| Ident::new(&format!("__cluster_{f}"), at_event))
            .collect();
        let f = &h.ident;
        let fname = f.to_string();
        let call = quote_spanned! {f.span()=>
            #output::report(#f(&#primary, #(#locals),*).await, #fname)
        };
        quote! {
            #event::#variant { #(#names: #locals,)* .. } => { #call; }
        }
    });
    quote! {
        while let ::core::option::Option::Some(#ev) = #primary.next_event().await {
            #[allow(unreachable_patterns)]
            match #ev {
                #(#arms)*
                _ => {}
            }
        }
    }
}
