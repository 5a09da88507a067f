//! The attributes behind `#[oxray::remote]` and `#[oxray::actor]`.
//!
//! Both keep the user's item unchanged and add, next to it, a typed entry point for remote submission plus a
//! registration in the link-time function table (`inventory`). The signature hash registered with each entry is the
//! token text of the argument and return types, so binaries that disagree about a signature refuse each other's
//! calls. Nothing here knows about the runtime beyond the `oxray::__private` functions it calls.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{
    FnArg, ImplItem, ImplItemFn, ItemFn, ItemImpl, Pat, ReturnType, Signature, Type,
    parse_macro_input,
};

/// Makes a function callable as a remote task.
///
/// Next to `fn name(a: A, b: B) -> R` it generates a module `name` with
/// `name::remote(a, b) -> oxray::Result<ObjectRef<R>>` (each argument may be an `A` or an `ObjectRef<A>`) and
/// `name::remote_with(&TaskOptions, a, b)`. The function itself stays callable directly.
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            Span::call_site(),
            "#[oxray::remote] takes no arguments; pass options with `remote_with`",
        )
        .to_compile_error()
        .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    match expand_remote(&func) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Makes a type an actor class: put it on the type's `impl` block.
///
/// `fn new(..) -> Self` is the constructor; every method taking `&self` or `&mut self` becomes a remote method.
/// With `ActorOptions::max_concurrency` above 1, calls to `&self` methods may overlap (`async` ones interleave on
/// the actor's thread; plain ones run on several threads if the type is `Sync`), while a `&mut self` method always
/// runs alone.
/// It generates `Type::remote(args) -> oxray::Result<ActorHandle<Type>>`, `Type::remote_with(&ActorOptions, args)`,
/// and a `TypeRemote` struct, which `ActorHandle<Type>` derefs to, with one typed method per actor method returning
/// `ObjectRef<R>`.
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            Span::call_site(),
            "#[oxray::actor] takes no arguments; pass options with `remote_with`",
        )
        .to_compile_error()
        .into();
    }
    let imp = parse_macro_input!(item as ItemImpl);
    match expand_actor(&imp) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The typed parameters of a signature, without the receiver.
struct Params {
    names: Vec<syn::Ident>,
    types: Vec<Type>,
}

fn params(sig: &Signature) -> syn::Result<Params> {
    let mut names = Vec::new();
    let mut types = Vec::new();
    for input in &sig.inputs {
        if let FnArg::Typed(pt) = input {
            let name = match &*pt.pat {
                Pat::Ident(pi) => pi.ident.clone(),
                other => {
                    return Err(syn::Error::new(
                        other.span(),
                        "oxray: use a plain name for each argument, not a pattern",
                    ));
                }
            };
            if let Type::Reference(r) = &*pt.ty {
                return Err(syn::Error::new(
                    r.span(),
                    "oxray: remote arguments are sent by value; take an owned type (e.g. `Vec<f32>`, not `&[f32]`)",
                ));
            }
            if let Type::ImplTrait(t) = &*pt.ty {
                return Err(syn::Error::new(
                    t.span(),
                    "oxray: remote arguments need a concrete type",
                ));
            }
            names.push(name);
            types.push((*pt.ty).clone());
        }
    }
    Ok(Params { names, types })
}

fn return_type(sig: &Signature) -> Type {
    match &sig.output {
        ReturnType::Default => syn::parse_quote!(()),
        ReturnType::Type(_, t) => (**t).clone(),
    }
}

fn check_plain(sig: &Signature) -> syn::Result<()> {
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "oxray: remote functions and methods cannot be generic",
        ));
    }
    if sig.variadic.is_some() {
        return Err(syn::Error::new(
            sig.span(),
            "oxray: variadic functions cannot be remote",
        ));
    }
    Ok(())
}

fn sig_text(types: &[Type], ret: &Type) -> String {
    let args: Vec<String> = types.iter().map(|t| quote!(#t).to_string()).collect();
    format!("({})->{}", args.join(","), quote!(#ret))
}

fn expand_remote(func: &ItemFn) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    check_plain(sig)?;
    if let Some(FnArg::Receiver(r)) = sig.inputs.first() {
        return Err(syn::Error::new(
            r.span(),
            "oxray: #[remote] is for free functions; use #[actor] on an impl block",
        ));
    }
    let name = &sig.ident;
    let vis = &func.vis;
    let Params { names, types } = params(sig)?;
    let ret = return_type(sig);
    let sig_str = sig_text(&types, &ret);
    let call = if sig.asyncness.is_some() {
        quote!(::oxray::__private::block_on(super::#name(#(#names),*)))
    } else {
        quote!(super::#name(#(#names),*))
    };
    let doc_remote = format!(
        "Submits [`{name}`](fn@super::{name}) as a remote task; the result arrives in the returned ref."
    );
    Ok(quote! {
        #func

        #[doc = concat!("Remote entry points of [`", stringify!(#name), "`](fn@", stringify!(#name), ").")]
        #[allow(non_snake_case, non_camel_case_types, clippy::module_name_repetitions)]
        #vis mod #name {
            #[allow(unused_imports)]
            use super::*;

            /// The name this function is registered under.
            pub const NAME: &str = module_path!();
            /// The hash of its argument and return types.
            pub const SIG: u64 = ::oxray::__private::fnv1a(#sig_str.as_bytes());

            #[doc = #doc_remote]
            pub fn remote(#(#names: impl ::oxray::IntoArg<#types>),*) -> ::oxray::Result<::oxray::ObjectRef<#ret>> {
                remote_with(&::oxray::TaskOptions::new(), #(#names),*)
            }

            /// As `remote`, with options (resources, retries, name, strategy).
            pub fn remote_with(
                opts: &::oxray::TaskOptions,
                #(#names: impl ::oxray::IntoArg<#types>),*
            ) -> ::oxray::Result<::oxray::ObjectRef<#ret>> {
                let args = (|| -> ::oxray::Result<::std::vec::Vec<::oxray::Arg>> {
                    Ok(vec![#(::oxray::IntoArg::<#types>::into_arg(#names)?),*])
                })();
                ::oxray::__private::submit_task(NAME, SIG, args, opts)
            }

            fn __invoke(mut args: ::oxray::__private::Args) -> ::oxray::Result<::oxray::__private::Bytes> {
                #(let #names: #types = args.next::<#types>()?;)*
                args.finish()?;
                let out: #ret = #call;
                ::oxray::__private::encode(&out)
            }

            ::oxray::__private::inventory::submit! {
                ::oxray::__private::FunctionEntry { name: NAME, sig: SIG, invoke: __invoke }
            }
        }
    })
}

fn expand_actor(imp: &ItemImpl) -> syn::Result<TokenStream2> {
    if imp.trait_.is_some() {
        return Err(syn::Error::new(
            imp.span(),
            "oxray: put #[actor] on the type's inherent impl block, not a trait impl",
        ));
    }
    if !imp.generics.params.is_empty() {
        return Err(syn::Error::new(
            imp.generics.span(),
            "oxray: actor types cannot be generic",
        ));
    }
    let self_ty = &imp.self_ty;
    let ty_ident = match &**self_ty {
        Type::Path(p) => p.path.segments.last().map(|s| s.ident.clone()),
        _ => None,
    }
    .ok_or_else(|| syn::Error::new(self_ty.span(), "oxray: #[actor] needs a named type"))?;
    let methods_ty = format_ident!("{}Remote", ty_ident);

    let mut ctor: Option<&ImplItemFn> = None;
    let mut methods: Vec<&ImplItemFn> = Vec::new();
    for item in &imp.items {
        if let ImplItem::Fn(f) = item {
            match f.sig.inputs.first() {
                Some(FnArg::Receiver(r)) => {
                    if r.reference.is_none() {
                        return Err(syn::Error::new(
                            r.span(),
                            "oxray: actor methods take `&self` or `&mut self` (the actor keeps its state)",
                        ));
                    }
                    check_plain(&f.sig)?;
                    methods.push(f);
                }
                _ if f.sig.ident == "new" => {
                    check_plain(&f.sig)?;
                    ctor = Some(f);
                }
                _ => {}
            }
        }
    }
    let ctor = ctor.ok_or_else(|| {
        syn::Error::new(
            imp.span(),
            "oxray: an actor needs a constructor `fn new(..) -> Self` in this impl block",
        )
    })?;
    let Params {
        names: c_names,
        types: c_types,
    } = params(&ctor.sig)?;
    let c_ret = return_type(&ctor.sig);
    let mut sig_all = format!("new{}", sig_text(&c_types, &c_ret));

    let mut stub_methods = Vec::new();
    let mut invokers = Vec::new();
    let mut entries = Vec::new();
    for (index, m) in methods.iter().enumerate() {
        let index = index as u32;
        let mname = &m.sig.ident;
        let Params { names, types } = params(&m.sig)?;
        let ret = return_type(&m.sig);
        sig_all.push_str(&format!(";{mname}{}", sig_text(&types, &ret)));
        let inv = format_ident!("__oxray_invoke_{}", mname);
        let call = if m.sig.asyncness.is_some() {
            quote!(::oxray::__private::block_on(state.#mname(#(#names),*)))
        } else {
            quote!(state.#mname(#(#names),*))
        };
        let doc = format!(
            "Calls `{ty_ident}::{mname}` on the actor; the result arrives in the returned ref."
        );
        stub_methods.push(quote! {
            #[doc = #doc]
            pub fn #mname(&self, #(#names: impl ::oxray::IntoArg<#types>),*) -> ::oxray::ObjectRef<#ret> {
                let args = (|| -> ::oxray::Result<::std::vec::Vec<::oxray::Arg>> {
                    Ok(vec![#(::oxray::IntoArg::<#types>::into_arg(#names)?),*])
                })();
                self.core.call(#index, args)
            }
        });
        invokers.push(quote! {
            fn #inv(
                state: &mut (dyn ::std::any::Any + ::std::marker::Send),
                mut args: ::oxray::__private::Args,
            ) -> ::oxray::Result<::oxray::__private::Bytes> {
                let state = ::oxray::__private::state::<#self_ty>(state)?;
                #(let #names: #types = args.next::<#types>()?;)*
                args.finish()?;
                let out: #ret = #call;
                ::oxray::__private::encode(&out)
            }
        });
        // A `&self` method also gets the form that takes a shared reference, so that calls may overlap when the
        // actor runs with `max_concurrency` above 1. `&mut self` methods never overlap with anything.
        let by_ref =
            matches!(m.sig.inputs.first(), Some(FnArg::Receiver(r)) if r.mutability.is_none());
        let (shared, start) = if !by_ref {
            (
                quote!(::std::option::Option::None),
                quote!(::std::option::Option::None),
            )
        } else if m.sig.asyncness.is_some() {
            let st = format_ident!("__oxray_start_{}", mname);
            invokers.push(quote! {
                fn #st(
                    state: &(dyn ::std::any::Any + ::std::marker::Send),
                    mut args: ::oxray::__private::Args,
                ) -> ::oxray::Result<::oxray::__private::LocalCall<'_>> {
                    let state = ::oxray::__private::state_ref::<#self_ty>(state)?;
                    #(let #names: #types = args.next::<#types>()?;)*
                    args.finish()?;
                    ::std::result::Result::Ok(::std::boxed::Box::pin(async move {
                        let out: #ret = state.#mname(#(#names),*).await;
                        ::oxray::__private::encode(&out)
                    }))
                }
            });
            (
                quote!(::std::option::Option::None),
                quote!(::std::option::Option::Some(#st)),
            )
        } else {
            let sh = format_ident!("__oxray_shared_{}", mname);
            invokers.push(quote! {
                fn #sh(
                    state: &(dyn ::std::any::Any + ::std::marker::Send),
                    mut args: ::oxray::__private::Args,
                ) -> ::oxray::Result<::oxray::__private::Bytes> {
                    let state = ::oxray::__private::state_ref::<#self_ty>(state)?;
                    #(let #names: #types = args.next::<#types>()?;)*
                    args.finish()?;
                    let out: #ret = state.#mname(#(#names),*);
                    ::oxray::__private::encode(&out)
                }
            });
            (
                quote!(::std::option::Option::Some(#sh)),
                quote!(::std::option::Option::None),
            )
        };
        let mname_str = mname.to_string();
        entries.push(quote!(::oxray::__private::MethodEntry {
            name: #mname_str,
            invoke: #inv,
            shared: #shared,
            start: #start,
        }));
    }
    let n_methods = entries.len();
    let c_call = if ctor.sig.asyncness.is_some() {
        quote!(::oxray::__private::block_on(<#self_ty>::new(#(#c_names),*)))
    } else {
        quote!(<#self_ty>::new(#(#c_names),*))
    };
    let ty_str = ty_ident.to_string();
    let doc_methods =
        format!("The remote methods of [`{ty_ident}`]: `ActorHandle<{ty_ident}>` derefs to this.");

    Ok(quote! {
        #imp

        #[doc = #doc_methods]
        #[derive(Clone, Debug)]
        pub struct #methods_ty {
            core: ::oxray::ActorCore,
        }

        impl ::std::convert::From<::oxray::ActorCore> for #methods_ty {
            fn from(core: ::oxray::ActorCore) -> Self {
                #methods_ty { core }
            }
        }

        impl #methods_ty {
            #(#stub_methods)*
        }

        impl #self_ty {
            /// Starts this actor (somewhere in the cluster) and returns a typed handle to it.
            pub fn remote(#(#c_names: impl ::oxray::IntoArg<#c_types>),*) -> ::oxray::Result<::oxray::ActorHandle<#self_ty>> {
                Self::remote_with(&::oxray::ActorOptions::new(), #(#c_names),*)
            }

            /// As `remote`, with options (name, lifetime, restarts, concurrency, resources).
            pub fn remote_with(
                opts: &::oxray::ActorOptions,
                #(#c_names: impl ::oxray::IntoArg<#c_types>),*
            ) -> ::oxray::Result<::oxray::ActorHandle<#self_ty>> {
                let args = (|| -> ::oxray::Result<::std::vec::Vec<::oxray::Arg>> {
                    Ok(vec![#(::oxray::IntoArg::<#c_types>::into_arg(#c_names)?),*])
                })();
                ::oxray::__private::create_actor::<#self_ty>(args, opts)
            }
        }

        impl ::oxray::ActorClass for #self_ty {
            const NAME: &'static str = concat!(module_path!(), "::", #ty_str);
            const SIG: u64 = ::oxray::__private::fnv1a(#sig_all.as_bytes());
            type Methods = #methods_ty;
        }

        const _: () = {
            fn __oxray_construct(
                mut args: ::oxray::__private::Args,
            ) -> ::oxray::Result<::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>> {
                #(let #c_names: #c_types = args.next::<#c_types>()?;)*
                args.finish()?;
                let state: #self_ty = #c_call;
                Ok(::oxray::__private::boxed(state))
            }
            #(#invokers)*
            fn __oxray_sync_view(
                state: &(dyn ::std::any::Any + ::std::marker::Send),
            ) -> ::std::option::Option<&(dyn ::std::any::Any + ::std::marker::Send + ::std::marker::Sync)> {
                #[allow(unused_imports)]
                use ::oxray::__private::{ViewNotSync as _, ViewSync as _};
                let state = state.downcast_ref::<#self_ty>()?;
                (&::oxray::__private::SyncProbe(state)).sync_view()
            }
            static __OXRAY_METHODS: [::oxray::__private::MethodEntry; #n_methods] = [#(#entries),*];
            ::oxray::__private::inventory::submit! {
                ::oxray::__private::ActorClassEntry {
                    name: <#self_ty as ::oxray::ActorClass>::NAME,
                    sig: <#self_ty as ::oxray::ActorClass>::SIG,
                    construct: __oxray_construct,
                    methods: &__OXRAY_METHODS,
                    sync_view: __oxray_sync_view,
                }
            }
        };
    })
}
