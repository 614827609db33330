{
  description = "persistent-worker: a persistent worker for Buck2 and the Bazel worker protocol";

  # The first `nix build` or `nix develop` writes flake.lock.
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    flake-utils.url = "github:numtide/flake-utils";
  };

  outputs = { self, nixpkgs, flake-utils }:
    flake-utils.lib.eachSystem [ "x86_64-linux" "aarch64-linux" ] (system:
      let
        pkgs = nixpkgs.legacyPackages.${system};
        version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;

        # grpcio builds the gRPC C core: cmake and a C++ compiler.
        worker = p: p.rustPlatform.buildRustPackage {
          pname = "persistent-worker";
          inherit version;
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ p.buildPackages.cmake p.buildPackages.protobuf ];
          doCheck = true;
        };

        # A static worker (musl, libstdc++ linked in) for the image.
        staticWorker = (worker pkgs.pkgsStatic).overrideAttrs (_: {
          # The tests start servers and workers; they ran in packages.default.
          doCheck = false;
        });

        # The same contents and user as ci/image.sh.
        user = "worker";
        uid = "65532";
        passwd = pkgs.writeTextDir "etc/passwd" "${user}:x:${uid}:${uid}:${user}:/tmp:/sbin/nologin\n";
        group = pkgs.writeTextDir "etc/group" "${user}:x:${uid}:\n";
      in
      {
        packages.default = worker pkgs;

        packages.image = pkgs.dockerTools.buildLayeredImage {
          name = "persistent-worker";
          tag = version;
          contents = [ passwd group ];
          extraCommands = ''
            install -d -m 0755 usr/local/bin
            install -m 0755 ${staticWorker}/bin/persistent-worker usr/local/bin/persistent-worker
            install -d -m 1777 tmp
          '';
          config = {
            User = "${uid}:${uid}";
            Env = [ "PATH=/usr/local/bin" ];
            WorkingDir = "/tmp";
          };
        };

        devShells.default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.default ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            cmake
            protobuf
            buck2
            jq
            umoci
            skopeo
          ];
        };
      });
}
