const $ = (id) => document.getElementById(id);
const drop = $("drop"), input = $("file");
["dragenter", "dragover"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach(e => drop.addEventListener(e, ev => { ev.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", ev => { if (ev.dataTransfer.files.length) send(ev.dataTransfer.files[0]); });
input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
$("opacity").addEventListener("input", () => { $("heat").style.opacity = $("opacity").value / 100; });

async function send(file) {
  $("status").textContent = "Analysing " + file.name + "…";
  $("status").className = "";
  const body = new FormData();
  body.append("file", file);
  let res, data;
  try {
    res = await fetch("/predict?heatmap=true", { method: "POST", body });
    data = await res.json();
  } catch (err) {
    $("status").textContent = "Request failed: " + err; $("status").className = "error"; return;
  }
  if (!res.ok) {
    $("status").textContent = "Error " + res.status + ": " + (data.detail || res.statusText);
    $("status").className = "error"; $("result").style.display = "none"; return;
  }
  $("status").textContent = "";
  $("result").style.display = "block";
  $("verdict").textContent = data.label === "PNEUMONIA" ? "Pneumonia suspected (above threshold)" : "Normal (below threshold)";
  $("prob").textContent = data.prob.toFixed(3);
  $("threshold").textContent = data.threshold.toFixed(3);
  $("fname").textContent = data.path;
  $("ood").style.display = data.ood ? "block" : "none";
  if (data.ood) { $("oodscore").textContent = data.ood_distance.toFixed(1); $("oodcut").textContent = data.ood_cutoff.toFixed(1); }
  $("base").src = "data:image/png;base64," + data.image_png;
  if (data.heatmap_png) {
    $("heat").src = "data:image/png;base64," + data.heatmap_png;
    $("heat").style.display = "block";
    $("heat").style.opacity = $("opacity").value / 100;
    $("camnote").textContent = "Grad-CAM for " + data.cam_target + ": where the model's evidence lies, not proof of a finding.";
  } else {
    $("heat").style.display = "none";
    $("camnote").textContent = "No heatmap for this model backend.";
  }
}
